"""The unlearning benchmark on ShapesCanvas: protocol and metrics (``unlearning``: UA / IRA / CRA, clean
rates, KID from ``kid``) and the baselines it compares with (``baselines``: negative prompt, SLD, UCE,
ESD-x, each tuned on the same validation sets as SAeUron)."""
