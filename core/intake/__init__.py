"""Intake: uploaded or local files become a model and a calibration dataset (every format,
read by content), and the two calls the CLI and the service make on files."""
