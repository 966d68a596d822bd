"""Train state, step builders and the loop."""
