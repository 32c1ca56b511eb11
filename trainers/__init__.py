"""personalize.trainers: one training recipe per file on a small shared loop."""
