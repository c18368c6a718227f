"""What differs between megatron-core and DeepSpeed."""
