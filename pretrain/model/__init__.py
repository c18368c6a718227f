"""The model: shapes, weight layout, build, init, FLOPs, memory checks."""
