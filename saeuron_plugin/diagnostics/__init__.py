"""Diagnostics of an intervention: what an unlearning edit does inside the model (``saeuron diagnose``).

Metrics live in the core (:mod:`saeuron_plugin.sae.diagnostics`), paired capture in the core and the
adapters (:mod:`saeuron_plugin.sae.probes`, :mod:`saeuron_plugin.diffusion.diagnose`); this package
turns runs into effect sizes, heatmaps and reports.
"""

from .analysis import summarize
from .commands import diagnose

__all__ = ["diagnose", "summarize"]
