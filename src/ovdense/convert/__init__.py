"""Official checkpoints -> ovdense, one module per official repository."""
