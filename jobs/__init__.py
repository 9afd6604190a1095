"""Entry points: the `recontext` command, the step registry (`steps`), the stage graph (`pipeline.toml`, `graph`), the runner, locking and recovery, maintenance, the Databricks bundle."""
