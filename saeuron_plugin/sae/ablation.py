"""The error-preserving edit that adapters apply to activations (rules and specs: :mod:`.spec`).

For each token and each latent i selected for concept c at the current τ bucket (see
:mod:`.selection`), when the latent is *active* for the concept, z_i > μ(i, τ, D) (the mean over
every prompt the library holds, all concepts and the background, pooled), the latent is replaced:

* ``reference`` (SAeUron): z_i ← γ · μ(i, τ, D_c) · z_i, γ < 0 (``strength`` s means γ = −s);
* ``zero``: z_i ← 0;
* ``clamp``: z_i ← c, a fixed value c ≤ 0.

Target replacement (``target``, α = ``target_scale``): on every token where any of concept c's
latents changed, the edit also adds α · (μ(τ, D_t) − μ(τ, D_c))·W_dec, the decoded difference of
the target's and the concept's mean latents at the bucket. Removal alone leaves the concept's slot
empty and the model may fill it with something between concepts (a red shape turns yellow-orange,
which no judge calls a colour); steering the same tokens toward a named concept gives a clean
image of it instead, as concept-replacement methods (UCE, Concept Ablation) do with their anchors.
Tokens where c does not fire are untouched, so prompts without c keep their images.
A target that is removed in the same call (by this ablator, or at another hookpoint of the same
``apply``: ``also_removed``) is dropped: that concept is only removed.

Several concepts at once: each keeps its own rule and scale. A latent selected by several
concepts in the same bucket takes the *most negative* of their results, token by token, so the
outcome does not depend on the order the concepts are listed in.

The edit is out = x + (z′ − z) · W_dec (times the token's std for ``input_unit_norm`` SAEs),
computed from the changed latents only: their decoder rows times a [tokens, |F|] matrix, never a
dense decode. Tokens where nothing changes keep x bit for bit, and when nothing changes at all
(CPU) the input object itself is returned.

Cost per token. ``threshold`` encoder: only the selected latents are encoded, |F|·d MACs, from
fp32 copies of their encoder rows gathered once per τ bucket, with b_dec folded into the bias
(W(x − b_dec) + b = Wx + (b − W·b_dec), the arithmetic of ``SparseAutoencoder.encode_subset``
without its full-width x − b_dec pass). ``topk`` encoder: the full encode (n·d MACs) decides
whether a latent is among the token's k winners, as the reference does. On CPU only the tokens
where a selected latent exceeds its gate are fully encoded (nowhere else can anything change), and
membership is decided by counting the entries above those latents, one comparison pass instead of
a TopK selection, which at small widths costs more than the GEMM (:mod:`.kernels`);
devices take the k-th largest pre-activation from a blocked selection (:func:`.kernels.kth_largest`).
On CPU the changed tokens are found on the host and only they are computed and written; on
other devices the edit is dense, and the only host sync is reading τ (none with ``sync_free``).

``legacy_error_sign=True`` reproduces the reference code, out = D(z′) + D(z) − x with full dense
decodes. That is a sign bug of the reference (its error term is D(z) − x instead of x − D(z), so
with nothing ablated it outputs 2·D(z) − x, not x); it exists for paper comparisons only.

Everything is differentiable with respect to x, so attacks can optimise through the intervention.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .calibration import ThresholdCalibrator, calibrate_threshold
from .kernels import _target, _topk_members, kth_largest
from .library import ConceptLibrary
from .model import SparseAutoencoder
from .selection import FeatureSelection, concept_scores, select_features
from .sites import CallContext
from .spec import AblationRule, ConceptAblation, ResolvedAblation
from .tau import TauGrid

ApplyTo = Literal["all", "cond", "uncond"]
_COPY_ROWS_BYTES = 32 << 20  # per-bucket copies of the selected SAE rows up to this size


@dataclass
class _Plan:
    """Everything one τ bucket needs, gathered once (fp32 copies of the SAE rows).

    ``latents`` [S]; ``gate`` μ(i, τ, D) [S]; ``cut`` [S]: the value pre_i must exceed for the
    latent to change (max(gate, θ) in threshold mode, where z_i = pre_i above θ); rule
    coefficients ``a``, ``b`` [S, C]; encoder rows ``w_enc`` [S, d] with b_dec folded into
    ``b_enc`` [S] (W(x − b_dec) + b = Wx + (b − W·b_dec): no full-width pass over x); decoder rows
    ``w_dec`` [S, d].
    """

    latents: Tensor
    gate: Tensor
    cut: Tensor
    a: Tensor
    b: Tensor
    w_enc: Tensor | None = None
    b_enc: Tensor | None = None
    w_dec: Tensor | None = None
    pos: Tensor | None = None
    """Index into the ablator's shared row tables when the rows are not copied per bucket."""
    member: Tensor | None = None
    """[S, J] fp32: 1 where latent s belongs to the selection of the j-th concept with a target."""
    steer: Tensor | None = None
    """[J, d] fp32: that concept's target shift α·(μ_t − μ_c)·W_dec at this bucket."""

    def to(self, device: torch.device) -> _Plan:
        return _Plan(*(None if t is None else t.to(device) for t in dataclasses.astuple(self)))


class FeatureAblator:
    """Edit activations to unlearn concepts: the one object adapters call per activation tensor.

    ``ablator(x, tau, cond_mask)`` (or ``ablator(x, ctx)`` with a :class:`~.sites.CallContext`:
    it is a site :class:`~.sites.Editor`) with x [..., d] (any leading shape; the first dim is the
    batch when ``tau`` or ``cond_mask`` are per row), ``tau`` a float, a [B] tensor (rows may sit
    in different buckets) or None for single-bucket libraries, ``cond_mask`` [B] bool marking
    conditional rows when known. ``apply_to`` limits the edit to the conditional or unconditional
    rows; when ``cond_mask`` is None the branch is unknown and every row is edited. Math runs in
    fp32 and the output has x's dtype.

    τ picks one bucket plan when all rows share a bucket. A τ tensor on a device is read on the
    host (one tiny copy per call; in eager mode cheaper than the extra kernels of a device-side
    lookup); ``sync_free=True`` never synchronises: buckets are looked up on the device and the
    edit is dense (for CUDA-graph capture), at the price of a few more kernels. ``encoder``
    overrides the SAE's encoder mode for this ablator (``"threshold"`` uses ``sae.cfg.threshold``
    or the library's calibrated θ). ``also_removed``: concepts removed elsewhere in the same call
    (other hookpoints); a target among them, or among this ablator's concepts, is dropped.
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        library: ConceptLibrary,
        ablations: Sequence[ConceptAblation | str] | ConceptAblation | str,
        *,
        legacy_error_sign: bool = False,
        apply_to: ApplyTo = "all",
        encoder: Literal["topk", "threshold"] | None = None,
        check_fingerprint: bool = True,
        sync_free: bool = False,
        also_removed: Collection[str] = (),
    ) -> None:
        if apply_to not in ("all", "cond", "uncond"):
            raise ValueError(f"apply_to must be 'all', 'cond' or 'uncond', got {apply_to!r}")
        library.check_sae(sae, fingerprint=check_fingerprint)
        if isinstance(ablations, str | ConceptAblation):
            ablations = [ablations]
        specs = [a if isinstance(a, ConceptAblation) else ConceptAblation(a) for a in ablations]
        names = [s.concept for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"a concept is listed twice: {names}")
        self.sae = _with_encoder(sae, library, encoder)
        self.library = library
        self.tau_grid: TauGrid = library.tau_grid
        self.legacy_error_sign = legacy_error_sign
        self.apply_to: ApplyTo = apply_to
        self.enabled = True
        self.sync_free = sync_free
        self.sparse_tokens = True
        """On CPU, find the changed tokens on the host and compute only those (off: the dense device path)."""
        # a target that is itself removed in the same call would bring back what the user removes:
        # that concept falls back to plain removal
        removed = {*names, *also_removed}
        self.ablations = [
            dataclasses.replace(r, target=None) if r.target in removed else r
            for r in (s.resolve(library) for s in specs)
        ]
        self.selections: dict[str, FeatureSelection] = {}
        for a in self.ablations:
            for name in (a.concept, a.target) if a.target else (a.concept,):
                if library.get(name).total_count == 0:
                    raise ValueError(f"concept {name!r} has no statistics yet")
            if a.target and legacy_error_sign:
                raise ValueError(f"{a.concept!r}: target replacement needs legacy_error_sign=False")
            scores = concept_scores(library, a.concept, a.contrast)
            self.selections[a.concept] = select_features(scores, a.percentile, a.top_n, self.tau_grid)
        self._build(self.sae.device)

    # ------------------------------------------------------------------ tables
    def _build(self, device: torch.device) -> None:
        lib, k_buckets = self.library, self.tau_grid.num_buckets
        gate_all = lib.all_means(fill_empty=True)
        coeffs = {a.concept: a.affine(lib.get(a.concept).means(fill_empty=True)) for a in self.ablations}
        targeted = [a for a in self.ablations if a.target]
        shifts = self._target_shifts(targeted) if targeted else None  # [K, J, d]
        plans: list[_Plan | None] = []
        for k in range(k_buckets):
            per_latent: dict[int, list[tuple[float, float]]] = {}
            for a in self.ablations:
                ca, cb = coeffs[a.concept]
                for i in self.selections[a.concept].bucket(k).tolist():
                    per_latent.setdefault(i, []).append((float(ca[k, i]), float(cb[k, i])))
            if not per_latent:
                plans.append(None)
                continue
            lat = sorted(per_latent)
            width = max(len(v) for v in per_latent.values())
            a_t = torch.zeros(len(lat), width)
            b_t = torch.full((len(lat), width), float("inf"))  # padding never wins the minimum
            for row, i in enumerate(lat):
                for col, (ca_, cb_) in enumerate(per_latent[i]):
                    a_t[row, col], b_t[row, col] = ca_, cb_
            plan = _Plan(torch.tensor(lat), *self._gates(gate_all[k, lat]), a_t, b_t)
            if shifts is not None:
                plan.member = torch.stack(
                    [torch.isin(plan.latents, self.selections[a.concept].bucket(k)) for a in targeted], 1
                ).float()
                plan.steer = shifts[k]
            plans.append(plan)
        # Padded copies for per-row lookups on the device: padding has gate +inf (never changes).
        s_max = max((len(p.latents) for p in plans if p is not None), default=0)
        c_max = max((p.a.shape[1] for p in plans if p is not None), default=0)
        self._lat = torch.zeros(k_buckets, s_max, dtype=torch.long)
        self._gate = torch.full((k_buckets, s_max), float("inf"))
        self._a = torch.zeros(k_buckets, s_max, c_max)
        self._b = torch.full((k_buckets, s_max, c_max), float("inf"))
        self._member = torch.zeros(k_buckets, s_max, len(targeted)) if targeted else None
        self._steer = shifts
        for k, p in enumerate(plans):
            if p is not None:
                s, c = p.a.shape
                self._lat[k, :s], self._gate[k, :s] = p.latents, p.gate
                self._a[k, :s, :c], self._b[k, :s, :c] = p.a, p.b
                if self._member is not None and p.member is not None:
                    self._member[k, :s] = p.member
        self._gather_rows(plans)
        self._plans = plans
        self._any = s_max > 0
        self.to(device)

    def _target_shifts(self, targeted: Sequence[ResolvedAblation]) -> Tensor:
        """[K, J, d] fp32: α·(μ(τ_k, D_t) − μ(τ_k, D_c))·W_dec for each concept with a target."""
        sae, lib = self.sae, self.library
        with torch.no_grad():
            diff = torch.stack(
                [
                    a.target_scale
                    * (lib.get(a.target).means(fill_empty=True) - lib.get(a.concept).means(fill_empty=True))
                    for a in targeted
                ],
                1,
            )  # [K, J, n]
            return (diff.float().to(sae.device) @ sae.W_dec.detach().float()).cpu()

    def _gates(self, gate: Tensor) -> tuple[Tensor, Tensor]:
        """(gate, cut) for a bucket: gates clamped at 0 (means of ReLU latents are never negative)."""
        gate = gate.float().clamp_min(0)
        theta = self.sae.cfg.threshold if self.sae.cfg.encoder == "threshold" else None
        return gate, (gate.clamp_min(theta) if theta is not None else gate)

    def _gather_rows(self, plans: list[_Plan | None]) -> None:
        """fp32 encoder rows (b_dec folded into the bias) and decoder rows of the selected latents.

        Copied per bucket when that stays small (no gather per call); otherwise (hundreds of
        latents over many buckets) kept once per distinct latent, each plan indexing into them.
        """
        sae = self.sae
        union = sorted({i for p in plans if p is not None for i in p.latents.tolist()})
        with torch.no_grad():
            idx = torch.tensor(union, dtype=torch.long, device=sae.device)
            w_enc = sae.encoder.weight[idx].double()
            b_enc = (sae.encoder.bias[idx].double() - w_enc @ sae.b_dec.double()).float().cpu()
            w_enc, w_dec = w_enc.float().cpu(), sae.W_dec[idx].float().cpu()
        where = {i: j for j, i in enumerate(union)}
        per_bucket_bytes = sum(len(p.latents) for p in plans if p is not None) * sae.d_in * 8
        self._u_enc, self._u_benc, self._u_dec = w_enc, b_enc, w_dec
        for p in plans:
            if p is None:
                continue
            pos = torch.tensor([where[i] for i in p.latents.tolist()], dtype=torch.long)
            if per_bucket_bytes <= _COPY_ROWS_BYTES:
                p.w_enc, p.b_enc, p.w_dec = w_enc[pos], b_enc[pos], w_dec[pos]
            else:
                p.pos = pos

    def _plan_rows(self, plan: _Plan) -> tuple[Tensor, Tensor, Tensor]:
        if plan.pos is None:
            return plan.w_enc, plan.b_enc, plan.w_dec  # type: ignore[return-value]
        return self._u_enc[plan.pos], self._u_benc[plan.pos], self._u_dec[plan.pos]

    def to(self, *args: Any, **kwargs: Any) -> FeatureAblator:
        """Move the SAE and the tables to a device; dtypes are ignored (math stays fp32). Returns self."""
        device = kwargs.get("device")
        for arg in args:
            if isinstance(arg, torch.device | str | int):
                device = arg
        if device is None:
            return self
        device = torch.device(device)
        self.sae.to(device)
        self._plans = [None if p is None else p.to(device) for p in self._plans]
        rows = (self._u_enc, self._u_benc, self._u_dec)
        self._u_enc, self._u_benc, self._u_dec = (t.to(device) for t in rows)
        tables = (self._lat, self._gate, self._a, self._b)
        self._lat, self._gate, self._a, self._b = (t.to(device) for t in tables)
        if self._member is not None and self._steer is not None:
            self._member, self._steer = self._member.to(device), self._steer.to(device)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FeatureAblator:
        """Shared, not copied (ComfyUI deep-copies patch options on every clone)."""
        return self

    # -------------------------------------------------------------- inspection
    @property
    def active(self) -> bool:
        """False when calling it cannot change anything (disabled, or nothing selected anywhere)."""
        return self.enabled and bool(self.ablations) and (self._any or self.legacy_error_sign)

    @property
    def concepts(self) -> list[str]:
        return [a.concept for a in self.ablations]

    def bucket_of(self, tau: float | Tensor | None) -> int:
        if tau is None or self.tau_grid.num_buckets == 1:
            return 0
        return self.tau_grid.nearest(float(tau.reshape(-1)[0]) if isinstance(tau, Tensor) else tau)

    def selected(self, tau: float | Tensor | None = None) -> dict[str, list[int]]:
        """Latents each concept ablates at the bucket of ``tau`` (for inspection)."""
        k = self.bucket_of(tau)
        return {name: sel.bucket(k).tolist() for name, sel in self.selections.items()}

    def describe(self) -> str:
        lines = [
            f"FeatureAblator on {self.sae.cfg.hookpoint or 'an SAE'} ({self.sae.cfg.encoder} encoder, "
            f"apply_to={self.apply_to}{', legacy_error_sign' if self.legacy_error_sign else ''})"
        ]
        for a in self.ablations:
            how = (
                f"γ={a.gamma:g}"
                if a.rule is AblationRule.REFERENCE
                else (f"clamp {a.clamp_value:g}" if a.rule is AblationRule.CLAMP else "zero")
            )
            sel = f"p={a.percentile}" if a.top_n is None else f"top {a.top_n}"
            if a.target:
                sel += f", → {a.target} (α={a.target_scale:g})"
            lines.append(
                f"- {a.concept}: {a.rule.value} {how}, {sel}; "
                + self.selections[a.concept].describe(limit=5).replace("\n", "\n  ")
            )
        return "\n".join(lines)

    # -------------------------------------------------------------------- call
    def __call__(
        self, x: Tensor, tau: float | Tensor | CallContext | None = None, cond_mask: Tensor | None = None
    ) -> Tensor:
        if isinstance(tau, CallContext):  # called as a site Editor: ``ablator(tokens, ctx)``
            tau, cond_mask = tau.tau, tau.cond_mask
        if not self.active:
            return x
        self.sae.check_input(x)
        rows = self._rows(x, cond_mask)
        bucket = self._bucket(tau, x)
        if self.legacy_error_sign:
            return self._legacy(x, bucket, rows)
        if isinstance(bucket, int):
            plan = self._plans[bucket]
            if plan is None:
                return x
            if rows is not None:
                rows = rows.view(-1, *([1] * (x.dim() - 2)))  # broadcast over the tokens of a row
            return self._apply_plan(x, plan, rows)
        # τ on the device: one bucket per row of the leading dim ([1]: one for all), looked up there
        b = bucket.numel()
        xr = x.reshape(b, -1, x.shape[-1])
        if rows is not None:
            rows = rows.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1]).reshape(b, -1)
        lat = self._lat[bucket]  # [b, S]
        s = lat.shape[1]
        z = self._encode(xr, lat.reshape(-1)).reshape(b, xr.shape[1], b, s)
        z = z.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # row r keeps its own bucket's latents: [b, T, S]
        change = z > self._gate[bucket].unsqueeze(1)
        steer = None
        if self._member is not None and self._steer is not None:
            steer = (self._member[bucket], self._steer[bucket])
        out = self._edit(
            xr,
            z,
            change,
            self._a[bucket],
            self._b[bucket],
            self._rows_of(lat),
            rows,
            batched=True,
            steer=steer,
        )
        return x if out is xr else out.reshape(x.shape)

    def _rows_of(self, latents: Tensor) -> Tensor:
        """Decoder rows of ``latents`` ([S] → [S, d], [B, S] → [B, S, d]) in fp32."""
        return self.sae.W_dec[latents].float()

    def _rows(self, x: Tensor, cond_mask: Tensor | None) -> Tensor | None:
        """[B] bool of the rows to edit, or None for all."""
        if self.apply_to == "all" or cond_mask is None:
            return None
        mask = cond_mask.to(device=x.device, dtype=torch.bool).reshape(-1)
        if x.dim() < 2 or mask.numel() != x.shape[0]:
            raise ValueError(f"cond_mask has {mask.numel()} rows; x has leading shape {tuple(x.shape[:-1])}")
        return mask if self.apply_to == "cond" else ~mask

    def _bucket(self, tau: float | Tensor | None, x: Tensor) -> int | Tensor:
        """One bucket for every row as a host int, else per-row buckets [B] ([1] when sync-free)."""
        grid = self.tau_grid
        if grid.num_buckets == 1:
            return 0
        if tau is None:
            raise ValueError(f"τ is required: the concept statistics have {grid.num_buckets} time buckets")
        if not isinstance(tau, Tensor):
            return grid.nearest(tau)
        flat = tau.detach().reshape(-1)
        if flat.device.type == "cpu" or not self.sync_free:
            values = flat.tolist()  # one host copy
            distinct = set(values)
            if len(distinct) == 1:  # the usual case: one timestep for the whole batch
                return grid.nearest(values[0])
            lookup = {t: grid.nearest(t) for t in distinct}
            buckets = [lookup[t] for t in values]
            if len(set(buckets)) == 1:
                return buckets[0]
            idx = torch.tensor(buckets)
        else:
            idx = grid.index(flat, check=False)
            if idx.numel() == 1:
                return idx.to(self._lat.device)
        if x.dim() < 2 or idx.numel() != x.shape[0]:
            raise ValueError(f"τ has {idx.numel()} values; x has leading shape {tuple(x.shape[:-1])}")
        return idx.to(self._lat.device)

    def _apply_plan(self, x: Tensor, plan: _Plan, rows: Tensor | None) -> Tensor:
        """The edit when every token uses the same bucket ``plan``."""
        sae = self.sae
        xs = sae._standardise(x)[0] if sae.cfg.input_unit_norm else x
        w_enc, b_enc, w_dec = self._plan_rows(plan)
        pre = F.linear(xs.float(), w_enc, b_enc)  # the selected latents only: |F|·d per token
        if sae.cfg.encoder == "threshold":
            # z_i = pre_i where pre_i > θ (and ReLU); it changes iff pre_i > max(gate_i, θ)
            return self._edit(
                x, pre, pre > plan.cut, plan.a, plan.b, w_dec, rows, batched=False, steer=_steer_of(plan)
            )
        # TopK: the full encode decides membership, but only where a selected latent passes its gate
        # can anything change; on CPU only those tokens are fully encoded (margin: rounding)
        idx = self._few_tokens((pre > plan.gate - 1e-4 * (1 + plan.gate)).any(-1), x)
        gate = plan.gate if self._host_path(x) else None  # membership by counting (host syncs)
        if idx is None:
            z = _topk_members(sae, x, plan.latents, gate)
        else:
            z = torch.zeros_like(pre)  # placeholders where nothing can change
            if idx[0].numel():
                z[idx] = _topk_members(sae, x[idx], plan.latents, gate)
        return self._edit(
            x, z, z > plan.gate, plan.a, plan.b, w_dec, rows, batched=False, steer=_steer_of(plan)
        )

    def _host_path(self, x: Tensor) -> bool:
        """True where data-dependent shortcuts (host syncs) pay: CPU, unless ``sparse_tokens`` is off."""
        return self.sparse_tokens and x.device.type == "cpu"

    def _few_tokens(self, mask: Tensor, x: Tensor) -> tuple[Tensor, ...] | None:
        """Indices of ``mask``'s True tokens when computing only those pays (CPU, at most half of
        them; one host sync), else None: the dense path, which devices always take."""
        if not self._host_path(x) or 2 * int(mask.sum()) > mask.numel():
            return None
        return mask.nonzero(as_tuple=True)

    def _encode(self, x: Tensor, latents: Tensor) -> Tensor:
        """Activations of ``latents`` [S'] per token, [..., S'] fp32 (per the SAE's encoder mode).

        Threshold mode encodes only those latents (the SAE's fast path); TopK mode needs the full
        encode to know whether a latent is among the token's k winners.
        """
        if self.sae.cfg.encoder == "threshold":
            return self.sae.encode_subset(x, latents).float()
        return _topk_members(self.sae, x, latents)

    def _edit(
        self,
        x: Tensor,
        z: Tensor,
        change: Tensor,
        a: Tensor,
        b: Tensor,
        w: Tensor,
        rows: Tensor | None,
        *,
        batched: bool,
        steer: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """out = x + (z′ − z)·W_dec[sel] on the tokens where ``change``; x itself if none (on CPU).

        Unbatched: a, b [S, C] and w [S, d] serve every token. Batched (per-row buckets): x [B, T, d]
        and a, b [B, S, C], w [B, S, d] per row. On CPU the changed tokens are counted on the host:
        none returns x; up to half are gathered, computed and written alone (a clone of x plus a few
        rows); more take the dense path. On a device the edit is dense and sync-free, with unchanged
        tokens taken from x by ``torch.where``. ``steer`` (member [S, J], shift [J, d]; [B, …]
        batched) adds shift j on the tokens where any latent of the j-th targeted concept changed.
        """
        if rows is not None:  # a token mask broadcastable to change.shape[:-1]
            change = change & rows.unsqueeze(-1)
        touched = change.any(-1)
        idx = self._few_tokens(touched, x)
        if idx is not None:  # few tokens change: compute and write only those
            if idx[0].numel() == 0:
                return x
            zc, cc, xc = z[idx], change[idx], x[idx]  # [m, S], [m, S], [m, d]
            if batched:
                a, b, w = a[idx[0]], b[idx[0]], w[idx[0]]
            dz = torch.where(cc, _target(zc, a, b) - zc, 0.0)
            delta = (dz.unsqueeze(-2) @ w).squeeze(-2) if batched else dz @ w
            if steer is not None:
                member, shift = (t[idx[0]] for t in steer) if batched else steer
                delta = delta + _steering(cc, member, shift, batched)
            if self.sae.cfg.input_unit_norm:
                delta = delta * self.sae._standardise(xc)[2].float()
            out = x.clone()
            out[idx] = (xc.float() + delta).to(x.dtype)
            return out
        if batched:
            a, b = a.unsqueeze(1), b.unsqueeze(1)  # broadcast over the tokens of each row
        delta = torch.where(change, _target(z, a, b) - z, 0.0) @ w
        if steer is not None:  # matmul broadcasts the per-row tables over the tokens
            delta = delta + _steering(change, *steer, batched=False)
        if self.sae.cfg.input_unit_norm:
            delta = delta * self.sae._standardise(x)[2].float()
        edited = (x.float() + delta).to(x.dtype)
        return torch.where(touched.unsqueeze(-1), edited, x)

    def _legacy(self, x: Tensor, bucket: int | Tensor, rows: Tensor | None) -> Tensor:
        """The reference code's output D(z′) + D(z) − x, with dense encode and decodes."""
        sae = self.sae
        shape = x.shape
        if isinstance(bucket, int):
            xr = x.reshape(-1, shape[-1])
            lat = self._lat[bucket].unsqueeze(0)  # [1, S]; padding has gate +inf
            gate, a, b = (t[bucket].unsqueeze(0) for t in (self._gate, self._a, self._b))
        else:
            xr = x.reshape(shape[0], -1, shape[-1])
            lat, gate, a, b = (t[bucket] for t in (self._lat, self._gate, self._a, self._b))
            lat, gate, a, b = lat.unsqueeze(1), gate.unsqueeze(1), a.unsqueeze(1), b.unsqueeze(1)
        z = sae.encode(xr).float()
        z_new = z
        if lat.shape[-1]:
            idx = lat.expand(*z.shape[:-1], lat.shape[-1])
            sub = z.gather(-1, idx)
            z_new = z.scatter_add(-1, idx, torch.where(sub > gate, _target(sub, a, b) - sub, 0.0))
        _, mean, std = sae._standardise(xr)

        def decode(code: Tensor) -> Tensor:
            out = sae.decode(code).float()
            return out * std.float() + mean.float() if std is not None else out

        out = (decode(z_new) + decode(z) - xr.float()).to(x.dtype).reshape(shape)
        if rows is not None:
            out = torch.where(rows.view(-1, *([1] * (x.dim() - 1))), out, x)
        return out


def _steer_of(plan: _Plan) -> tuple[Tensor, Tensor] | None:
    return None if plan.member is None or plan.steer is None else (plan.member, plan.steer)


def _steering(change: Tensor, member: Tensor, shift: Tensor, batched: bool) -> Tensor:
    """[m, d]: the target shifts of the concepts that fired on each of m gathered tokens.

    change [..., S] with member [S, J] and shift [J, d] (or per-row tables [B, S, J], [B, J, d]
    with change [B, T, S]); ``batched``: gathered tokens, each with its own row's tables, change
    [m, S], member [m, S, J], shift [m, J, d]."""
    if not batched:
        return ((change.float() @ member) > 0).float() @ shift
    fired = (change.float().unsqueeze(-2) @ member) > 0  # [m, 1, J]
    return (fired.float() @ shift).squeeze(-2)


def _with_encoder(sae: SparseAutoencoder, library: ConceptLibrary, encoder: str | None) -> SparseAutoencoder:
    """``sae`` itself, or a view sharing its parameters with another encoder mode."""
    if encoder is None or encoder == sae.cfg.encoder:
        return sae
    threshold = sae.cfg.threshold
    if encoder == "threshold" and threshold is None:
        threshold = library.calibrated_threshold
        if threshold is None:
            raise ValueError(
                "encoder='threshold' needs θ: this SAE has none and the concept library has no "
                "calibrated one (pass a ThresholdCalibrator to the statistics pass)"
            )
    view = copy.copy(sae)  # shares the parameter dict; only the config differs
    view.cfg = sae.cfg.replace(encoder=encoder, threshold=threshold)
    return view


__all__ = [
    "AblationRule",
    "ConceptAblation",
    "FeatureAblator",
    "ResolvedAblation",
    "ThresholdCalibrator",
    "calibrate_threshold",
    "kth_largest",
]
