"""The lakehouse and the Spark jobs: one module per stage, each reading and writing declared tables."""
