"""Strict loading of RIFE's ``flownet.pkl`` (Practical-RIFE's release format, the file LightX2V's
``video_frame_interpolation.model_path`` names).

The release file is ``torch.save`` of the training wrapper's state dict: every key carries the ``module.`` prefix of
``DistributedDataParallel`` (``module.block0.conv0.0.0.weight``, ...), and the v4.2x files also hold the weights of two
training-only parts, a teacher block (``module.teacher.*``) and a time estimator (``module.caltime.*``), which the
original loaders skip by loading non-strictly. Here the prefix is stripped (a file without it is accepted too), the
training-only parts are dropped by name (:data:`TRAINING_ONLY_PREFIXES`), the widths are read from the tensors, and
every other key must match the network exactly: one :class:`~lightx2v.errors.CheckpointError` lists every missing,
unexpected and mis-shaped tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.rife.ifnet import IFNet, IFNetConfig
from lightx2v.loading import key_report
from lightx2v.loading import require_file, torch_load_state_dict

__all__ = ["RIFE_FILE", "DDP_PREFIX", "TRAINING_ONLY_PREFIXES", "rife_file", "ifnet_config_from_state_dict",
           "load_rife", "save_rife"]

RIFE_FILE = "flownet.pkl"
DDP_PREFIX = "module."
# Sub-networks a release file may carry that inference never runs (RIFE v4.2x: the distillation teacher and the
# time estimator); their keys are dropped without a shape check (their shapes vary between releases).
TRAINING_ONLY_PREFIXES = ("teacher.", "caltime.")


def rife_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/flownet.pkl`` for a folder (LightX2V's docs name the ``train_log`` folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / RIFE_FILE
    return require_file(path, "RIFE model (flownet.pkl)")


def _strip_prefix(sd: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` prefix: from every key, or from none (a file saved without DDP); a mix is an error."""
    prefixed = [k for k in sd if k.startswith(DDP_PREFIX)]
    if not prefixed:
        return dict(sd)
    plain = sorted(k for k in sd if not k.startswith(DDP_PREFIX))
    if plain:
        raise CheckpointError(f"{source}: {len(prefixed)} keys carry the {DDP_PREFIX!r} prefix and {len(plain)} do "
                              f"not ({', '.join(plain[:10])}{' ...' if len(plain) > 10 else ''}): not a RIFE flownet")
    return {k[len(DDP_PREFIX):]: v for k, v in sd.items()}


def ifnet_config_from_state_dict(sd: dict[str, torch.Tensor]) -> IFNetConfig:
    """The widths of the IFNet whose (prefix-free) tensors ``sd`` holds: block i's width from
    ``block{i}.conv0.1.0.weight`` [c, c/2, 3, 3], the head's from ``encode.cnn0.weight`` [h, 3, 3, 3] and the feature
    channels from ``encode.cnn3.weight`` [h, F, 4, 4] (a transposed conv). Raises KeyError/IndexError where a tensor
    is absent or not of that rank."""
    widths = []
    while f"block{len(widths)}.conv0.1.0.weight" in sd:
        widths.append(int(sd[f"block{len(widths)}.conv0.1.0.weight"].shape[0]))
    if not widths:
        raise KeyError("block0.conv0.1.0.weight")
    return IFNetConfig(block_channels=tuple(widths), feature_channels=int(sd["encode.cnn3.weight"].shape[1]),
                       head_channels=int(sd["encode.cnn0.weight"].shape[0]))


def load_rife(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> IFNet:
    """Load RIFE's IFNet from ``flownet.pkl`` (or a folder holding it), strictly; see the module docstring.

    The network is built on the meta device from the widths found in the file (RIFE v4.26's are
    :class:`IFNetConfig`'s defaults) and the tensors are assigned in ``dtype`` on ``device``. A file that is not an
    IFNet of this generation raises :class:`CheckpointError` naming the expected and the found keys.
    """
    source = rife_file(path)
    sd = _strip_prefix(torch_load_state_dict(source), source)
    dropped = [k for k in sd if k.startswith(TRAINING_ONLY_PREFIXES)]
    for k in dropped:
        del sd[k]
    try:
        cfg = ifnet_config_from_state_dict(sd)
    except (KeyError, IndexError, UserError) as e:
        cfg = None
        why = f"cannot read the widths ({type(e).__name__}: {e})"
    if cfg is not None:
        with torch.device("meta"):
            net = IFNet(cfg)
        expected = {k: v.shape for k, v in net.state_dict().items()}
        problems = key_report(expected, sd)
        if not problems:
            tensors = {k: sd[k].to(device=device, dtype=dtype) for k in expected}
            result = net.load_state_dict(tensors, strict=False, assign=True)
            assert not result.missing_keys and not result.unexpected_keys
            return net.eval().requires_grad_(False)
        why = f"does not fit an IFNet of widths {cfg}"
    else:  # report against the v4.26 network, the one LightX2V loads
        with torch.device("meta"):
            net = IFNet()
        problems = key_report({k: v.shape for k, v in net.state_dict().items()}, sd)
    raise CheckpointError(
        f"{source} is not a RIFE v4.2x flownet ({why}; the file holds {len(sd)} tensors"
        + (f" besides the training-only {'/'.join(TRAINING_ONLY_PREFIXES)} ones" if dropped else "") + "): "
        + "; ".join(problems)
    )


def save_rife(net: IFNet, path: str | Path, *, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``net`` as the release does: ``torch.save`` of its state dict with every key prefixed ``module.``
    (``extra``: more tensors to store under their own names after the prefix, e.g. ``teacher.*`` to mimic a release
    file). ``path``: the file, or a folder that receives ``flownet.pkl``. Returns the file written."""
    path = Path(path)
    if path.is_dir():
        path = path / RIFE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {**{k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, **(extra or {})}
    torch.save({DDP_PREFIX + k: v for k, v in tensors.items()}, path)
    return path
