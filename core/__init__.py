"""The bottom layer: settings (`settings`), errors (`errors`), the table catalog (`tables`) and the
shared vocabularies (`vocabulary`). udfs, etl, training and jobs import it; it imports none of
them (tests/test_layers.py)."""
