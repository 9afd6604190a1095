"""The lakehouse and the Spark jobs: table catalog, shared vocabularies, and one module per pipeline step, each declaring (etl/step.py) the tables it reads and writes and the models it loads."""
