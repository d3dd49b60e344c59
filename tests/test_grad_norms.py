"""Per-sample gradient norms over parameters: every mode against torch.func per-sample
gradients, alone (``per_sample_grad_norms``) and inside a real Lightning training step
(``TrainingDynamics(grad_norm=...)``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from torchdebug import TrainingDynamics, load_report, per_sample_grad_norms
from torchdebug.grad_norms import LayerTaps

RTOL = 1e-4


def reference_norms(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    only: Callable[[str], bool] = lambda name: True,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> Tensor:
    """||d loss(model(x_i), y_i) / d params|| per sample, from torch.func per-sample grads
    over the trainable parameters that ``only`` keeps."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    params = {n: p for n, p in trainable.items() if only(n)}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, ({**p, **rest}, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))


def assert_close(got: Tensor, want: Tensor) -> None:
    assert got.shape == want.shape
    rel = ((got - want).abs() / want.abs().clamp_min(1e-12)).max().item()
    assert rel < RTOL, f"relative error {rel:.2e}\ngot  {got}\nwant {want}"


class TokenModel(nn.Module):
    """Embedding (with a padding index) + Linear over tokens + LayerNorm, mean-pooled."""

    def __init__(self, vocab: int = 30, width: int = 16, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.proj = nn.Linear(width, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.norm(torch.relu(self.proj(self.embed(tokens))))
        return self.head(h.mean(dim=1))


class Reused(nn.Module):
    """One Linear applied twice in a forward pass: its gradient sums both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.inner(torch.tanh(self.inner(x))))


class Attention(nn.Module):
    """Self-attention whose projections nn.MultiheadAttention uses without calling them."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def tokens(batch: int, length: int, vocab: int = 30) -> Tensor:
    t = torch.randint(1, vocab, (batch, length))
    t[:, -2:] = 0  # padding
    t[:, 1] = t[:, 0]  # a repeated token within each sample
    return t


def cases() -> dict[str, tuple[nn.Module, Tensor, Tensor]]:
    torch.manual_seed(0)
    return {
        "mlp": (
            nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)),
            torch.randn(6, 10),
            torch.randint(0, 4, (6,)),
        ),
        "cnn": (
            nn.Sequential(
                nn.Conv2d(2, 8, 3, padding=1),
                nn.GroupNorm(2, 8),
                nn.ReLU(),
                nn.Conv2d(
                    8, 8, 3, stride=2, dilation=2, padding=2, groups=2, padding_mode="reflect"
                ),
                nn.Flatten(),
                nn.Linear(8 * 4 * 4, 3),
            ),
            torch.randn(6, 2, 8, 8),
            torch.randint(0, 3, (6,)),
        ),
        # 7 tokens of width 16: the Gram form (7 * 32 < 16 * 16).
        "tokens_gram": (TokenModel(), tokens(6, 7), torch.randint(0, 4, (6,))),
        # 40 tokens of width 4: materialising (40 * 8 > 4 * 4).
        "tokens_materialised": (
            TokenModel(width=4, hidden=4),
            tokens(6, 40),
            torch.randint(0, 4, (6,)),
        ),
        "conv1d_same": (
            nn.Sequential(nn.Conv1d(3, 4, 3, padding="same"), nn.Flatten(), nn.Linear(36, 3)),
            torch.randn(6, 3, 9),
            torch.randint(0, 3, (6,)),
        ),
        "conv3d": (
            nn.Sequential(
                nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1)), nn.Flatten(), nn.Linear(72, 3)
            ),
            torch.randn(6, 2, 4, 5, 5),
            torch.randint(0, 3, (6,)),
        ),
        "reused_linear": (Reused(), torch.randn(6, 6), torch.randint(0, 3, (6,))),
    }


def last_layer_only(model: nn.Module) -> Callable[[str], bool]:
    final = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return lambda name: name.startswith(final + ".")


@pytest.mark.parametrize("case", list(cases()))
def test_full_and_last_layer_match_torch_func(case: str) -> None:
    model, x, y = cases()[case]
    assert_close(
        per_sample_grad_norms(model, F.cross_entropy, x, y, mode="full"),
        reference_norms(model, x, y),
    )
    assert_close(
        per_sample_grad_norms(model, F.cross_entropy, x, y, mode="last_layer"),
        reference_norms(model, x, y, last_layer_only(model)),
    )


def test_logits_mode_is_the_cross_entropy_gradient_norm() -> None:
    model, x, y = cases()["mlp"]
    logits = model(x).detach()
    want = (torch.softmax(logits, 1) - F.one_hot(y, 4)).norm(dim=1)
    assert_close(per_sample_grad_norms(model, F.cross_entropy, x, y), want)


@pytest.mark.parametrize("case", list(cases()))
@pytest.mark.parametrize("mode", ["logits", "last_layer", "full"])
def test_same_sample_same_norm_at_batch_sizes_1_and_4_and_any_reduction(
    case: str, mode: str
) -> None:
    model, x, y = cases()[case]
    alone = per_sample_grad_norms(model, F.cross_entropy, x[:1], y[:1], mode=mode)
    summed = nn.CrossEntropyLoss(reduction="sum")
    in_batch = per_sample_grad_norms(model, summed, x[:4], y[:4], mode=mode)
    unreduced = nn.CrossEntropyLoss(reduction="none")
    assert_close(in_batch[:1], alone)
    assert_close(per_sample_grad_norms(model, unreduced, x[:4], y[:4], mode=mode), in_batch)
    assert len({round(v, 4) for v in in_batch.tolist()}) == 4  # really per sample


def test_frozen_parameters_are_left_out() -> None:
    model, x, y = cases()["cnn"]
    model[0].requires_grad_(False)
    got = per_sample_grad_norms(model, F.cross_entropy, x, y, mode="full")
    assert_close(got, reference_norms(model, x, y))
    assert LayerTaps(model, "full").coverage == 1.0  # of the trainable parameters


def test_batch_norm_is_excluded_and_reported_or_refused_when_strict() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    taps = LayerTaps(model, "full")
    assert set(taps.excluded) == {"1.weight", "1.bias"}
    assert taps.coverage == pytest.approx(1 - 16 / (48 + 16 + 27))
    with pytest.raises(ValueError, match=r"1\.weight, 1\.bias.*BatchNorm1d.*GroupNorm"):
        LayerTaps(model, "full", strict=True)
    model.eval()  # a fixed affine map: the other layers' norms are per-sample exact
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with pytest.warns(UserWarning, match=r"covers 82\.4% .*1\.weight"):
        got = per_sample_grad_norms(model, F.cross_entropy, x, y, mode="full")
    assert_close(got, reference_norms(model, x, y, lambda n: not n.startswith("1.")))


def test_shared_weights_are_excluded() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 10)
            self.mix = nn.Linear(10, 10)
            self.out = nn.Linear(10, 10)
            self.out.weight = self.embed.weight

        def forward(self, t: Tensor) -> Tensor:
            return self.out(self.mix(self.embed(t)).mean(1))

    model = Tied()
    taps = LayerTaps(model, "full")
    assert set(taps.excluded) == {"embed.weight", "out.weight"}
    x, y = torch.randint(0, 10, (5, 3)), torch.randint(0, 10, (5,))
    with pytest.warns(UserWarning, match="embed.weight .shared with another module."):
        got = per_sample_grad_norms(model, F.cross_entropy, x, y, mode="full")
    assert_close(
        got, reference_norms(model, x, y, lambda n: n in {"mix.weight", "mix.bias", "out.bias"})
    )
    with pytest.raises(ValueError, match="embed.weight.*shared"):
        per_sample_grad_norms(model, F.cross_entropy, x, y, mode="full", strict=True)
    with pytest.raises(ValueError, match="tied weights"):  # the head's weight has other terms
        per_sample_grad_norms(model, F.cross_entropy, x, y, mode="last_layer")


def test_weights_used_functionally_by_a_parent_are_excluded() -> None:
    torch.manual_seed(2)
    model, x, y = Attention(), torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    taps = LayerTaps(model, "full")
    assert "attn.in_proj_weight" in taps.excluded
    with pytest.warns(UserWarning, match="attn.out_proj.weight .its parent uses the weights"):
        got = per_sample_grad_norms(model, F.cross_entropy, x, y, mode="full")
    assert_close(got, reference_norms(model, x, y, lambda n: n.startswith("head.")))


def test_bad_mode_and_last_layer_without_a_linear_output() -> None:
    model, x, y = cases()["mlp"]
    with pytest.raises(ValueError, match="one of"):
        per_sample_grad_norms(model, F.cross_entropy, x, y, mode="params")  # type: ignore[arg-type]
    with torch.no_grad(), pytest.raises(RuntimeError, match="outside torch.no_grad"):
        per_sample_grad_norms(model, F.cross_entropy, x, y)
    scaled = nn.Sequential(model, nn.Softplus())  # logits are not a Linear's output
    with pytest.raises(ValueError, match="output of an nn.Linear"):
        per_sample_grad_norms(scaled, F.cross_entropy, x, y, mode="last_layer")


# ---------------------------------------------------------------- inside a training step

N = 48


def dataset() -> TensorDataset:
    torch.manual_seed(3)
    return TensorDataset(torch.randn(N, 2, 6, 6), torch.randint(0, 3, (N,)))


class Net(L.LightningModule):
    """CNN with GroupNorm; SGD with lr 0, so the reference sees the weights the steps saw.

    ``reduction``, ``loss_scale`` and ``weights`` change the training loss's scale per
    row; ``manual_amp`` trains through a real ``torch.amp.GradScaler``; ``logit_penalty``
    adds a term that is not cross-entropy."""

    def __init__(
        self,
        reduction: str = "mean",
        loss_scale: float = 1.0,
        weighted: bool = False,
        manual_amp: bool = False,
        logit_penalty: float = 0.0,
        smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.net = nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1),
            nn.GroupNorm(3, 6),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 36, 16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )
        self.reduction, self.loss_scale, self.weighted = reduction, loss_scale, weighted
        self.logit_penalty, self.smoothing = logit_penalty, smoothing
        self.automatic_optimization = not manual_amp
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if manual_amp else None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none", label_smoothing=self.smoothing)
        losses = losses + self.logit_penalty * logits.square().sum(1)
        if self.weighted:
            losses = losses * (0.2 + (y.float() + 1) / 4)
        loss = losses.mean() if self.reduction == "mean" else losses.sum()
        loss = loss * self.loss_scale
        if self.scaler is not None:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self.scaler.scale(loss))
            self.scaler.step(opt.optimizer)
            self.scaler.update()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(
    root: Path,
    module: L.LightningModule,
    grad_norm: str,
    loader: DataLoader | None = None,
    **trainer_kw: Any,
) -> TrainingDynamics:
    """One epoch with TrainingDynamics(grad_norm=...); the CNN's data unless ``loader``."""
    callback = TrainingDynamics(grad_norm=grad_norm, tensorboard=False)
    trainer = L.Trainer(
        max_epochs=1,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **trainer_kw,
    )
    trainer.fit(module, loader or DataLoader(dataset(), batch_size=8, shuffle=True))
    return callback


def recorded(callback: TrainingDynamics) -> Tensor:
    report = callback.report().sort_values("sample_id")
    assert report["sample_id"].tolist() == list(range(N))
    return torch.tensor(report["grad_norm_mean"].to_numpy(), dtype=torch.float32)


@pytest.mark.parametrize(
    ("setup", "trainer_kw"),
    [
        ({}, {}),
        ({"reduction": "sum", "weighted": True}, {"accumulate_grad_batches": 2}),
        ({"loss_scale": 512.0}, {"accumulate_grad_batches": 3}),
        ({"manual_amp": True}, {}),
    ],
    ids=["mean", "sum_weighted_accumulated", "scaled_accumulated", "grad_scaler"],
)
def test_callback_full_mode_equals_per_sample_reference(
    tmp_path: Path, setup: dict[str, Any], trainer_kw: dict[str, Any]
) -> None:
    module = Net(**setup)
    callback = fit(tmp_path, module, "full", **trainer_kw)
    x, y = dataset().tensors
    assert_close(recorded(callback), reference_norms(module.net, x, y))
    meta = load_report(tmp_path)
    assert meta.attrs["torchdebug"]["grad_norm"] == "full"
    assert meta.attrs["torchdebug"]["grad_norm_coverage"] == 1.0


def test_callback_last_layer_and_frozen_layers(tmp_path: Path) -> None:
    module = Net()
    module.net[0].requires_grad_(False)
    full = fit(tmp_path / "full", module, "full")
    last = fit(tmp_path / "last", module, "last_layer")
    x, y = dataset().tensors
    assert_close(recorded(full), reference_norms(module.net, x, y))
    assert_close(recorded(last), reference_norms(module.net, x, y, lambda n: n.startswith("6.")))
    logits = fit(tmp_path / "logits", module, "logits")
    assert (recorded(last) > recorded(logits)).all()  # ||d|| sqrt(||h||^2 + 1) > ||d||
    assert load_report(tmp_path / "last").attrs["torchdebug"]["grad_norm"] == "last_layer"


def test_callback_warns_when_the_loss_is_not_cross_entropy(tmp_path: Path) -> None:
    for i, net in enumerate([Net(logit_penalty=0.5), Net(smoothing=0.1)]):
        with pytest.warns(UserWarning, match="not a multiple of the cross-entropy gradient"):
            fit(tmp_path / str(i), net, "full")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|log_every).*")
        fit(tmp_path / "plain", Net(), "full")


def test_parameter_modes_refuse_torch_compile_and_logits_runs_compiled(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torch.compile"):
        fit(tmp_path / "full", torch.compile(Net()), "full")  # type: ignore[arg-type]
    compiled = fit(tmp_path / "logits", torch.compile(Net()), "logits")  # type: ignore[arg-type]
    assert recorded(compiled).gt(0).all()


class AttentionNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net = Attention()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_callback_finds_weights_used_without_a_module_call(tmp_path: Path) -> None:
    torch.manual_seed(6)
    x, y = torch.randn(16, 5, 8), torch.randint(0, 3, (16,))
    module = AttentionNet()
    callback = fit(tmp_path, module, "full", DataLoader(TensorDataset(x, y), batch_size=4))
    meta = load_report(tmp_path).attrs["torchdebug"]
    assert {"net.attn.in_proj_weight", "net.attn.out_proj.weight"} <= set(
        meta["grad_norm_excluded"]
    )
    assert meta["grad_norm_coverage"] == pytest.approx(27 / (8 * 24 + 24 + 64 + 8 + 27))
    report = callback.report().sort_values("sample_id")
    got = torch.tensor(report["grad_norm_mean"].to_numpy(), dtype=torch.float32)
    assert_close(got, reference_norms(module.net, x, y, lambda n: n.startswith("head.")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_callback_full_mode_under_cuda_16_mixed_with_grad_scaler(tmp_path: Path) -> None:
    module = Net()
    callback = fit(tmp_path, module, "full", accelerator="cuda", devices=1, precision="16-mixed")
    x, y = dataset().tensors
    want = reference_norms(module.net.cpu().float(), x, y)
    got = recorded(callback)
    assert ((got - want).abs() / want).max() < 2e-2  # fp16 activations: 3 digits
