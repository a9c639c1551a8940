"""minijamba: Mamba and Jamba from scratch, checked against a float64 NumPy reference.

The modules follow the lessons: `reference` (the NumPy oracle) and `s4` (lesson 01), then the selective scan,
the Mamba block, the Jamba hybrid, MoE routing, the fused kernels and training, each in its own file.
"""

__version__ = "0.1.0"
