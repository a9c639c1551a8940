"""minijamba: Mamba and Jamba from scratch, checked against a float64 NumPy reference.

The modules follow the lessons: `reference` (the NumPy oracle) and `s4` (lesson 01), `s6` and `tasks` (02), `scan`
(03), `mamba` (04), `attention` and `jamba` (05), `moe` (06), `fused` and `cuda/` (07), `data`, `train` and
`sample` (08), each in its own file. `teaching`, `plotting` and `student` serve the lessons themselves.
"""

__version__ = "0.1.0"
