"""Training, evaluation and fine-tuning (above models and data). Import the submodules directly."""
