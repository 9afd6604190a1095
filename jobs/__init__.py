"""Entry points: the `recontext` command and the job definitions that call the stages."""
