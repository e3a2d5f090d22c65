"""TF1 parity tests (oracle in a TensorFlow subprocess) and the tutorial ports."""
