"""The other methods the trainer carries as config options (docs/methods.md).

- `smartclip`: caption-conditioned mask head and the modular contrastive loss.
- `isoclip`: training-free spectral filter of the two projections, intra-modal metrics.
- `holistic`: multi-branch image heads, the multi-to-multi loss, branch fusion.

Everything here is a pure function or a self-contained linen module; the model and
`objective.py` wire them in.
"""
