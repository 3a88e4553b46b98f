"""The orchestrator: the training state machine (rounds, quorum, deadlines, tests, finish)."""
