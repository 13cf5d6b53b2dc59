"""Tuning the ablation of a bundle's concepts with a judge (issue #19).

* :mod:`.judges`: judges as plug-ins (ShapesCanvas, CLIP zero-shot, any ``module:function``);
* :mod:`.search`: the per-concept search (``saeuron tune``); ``make bundle``
  (``saeuron_plugin.shapescanvas.build``) is a recipe over it, with labelled validation sets;
* :mod:`.build`: ``saeuron build RECIPE``, collect → train → statistics → tune → bundle, resumable.
"""

from .judges import CallableJudge, ClipZeroShotJudge, Judge, JudgeLoadError, load_judge

__all__ = ["CallableJudge", "ClipZeroShotJudge", "Judge", "JudgeLoadError", "load_judge"]
