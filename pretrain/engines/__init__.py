"""What differs between megatron-core and DeepSpeed: the ``Engine`` interface (``base``), its two
implementations (``megatron``, ``deepspeed``), and what is built on it (``slots``, ``adam_state``,
``convert``)."""
