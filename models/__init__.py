"""Neural networks: patch encoders and MIL aggregators."""
