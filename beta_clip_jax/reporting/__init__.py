"""Reporting: the run's metrics log (metrics_writer), its curves and heat map (plots),
several runs side by side (compare) and one image's attention maps (visualize)."""
