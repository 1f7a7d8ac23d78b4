"""sana_rl.reward.v1: reward.proto and its generated stubs (regenerate with `make proto`)."""
