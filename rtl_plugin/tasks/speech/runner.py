"""Speech enhancement with one ticket per acoustic environment (the paper's §4 audio experiment, offline).

``run_speech(config, out_dir)``: the noisy-speech data of :mod:`rtl_plugin.tasks.speech.data` (indoor / outdoor /
transport noise, unseen test noise sources), the complex-STFT :class:`~rtl_plugin.integrations.audio.AudioUNet`,
weighted SDR loss and SI-SNRi (dB) as the metric. Methods, all from the same θ0 and with the same number
of sample presentations (equal per-input cost matching: each ticket as sparse as the single model):

* ``rtl``: per-environment IMP ticket search (weight granularity) + joint retraining, routed by the known
  environment (``context``) and by a learned router on the noisy spectrogram (``learned``, label-free);
* ``single_imp``: one mask, one model, shuffled batches over all environments;
* ``multi_imp``: K independent models, one per environment;
* ``dense``: the unpruned model trained like the single model (reference).

Writes ``results.json`` (the stable results schema, metric ``si_snri``) and figures (spectrograms of
noisy / enhanced / clean per environment, SI-SNRi vs sparsity).
"""
from __future__ import annotations

import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from rtl_plugin import wrap
from rtl_plugin.comparison.baselines import CyclicLoader
from rtl_plugin.comparison.protocol import ComparisonConfig, ComparisonTask, Evaluation, SingleImpSetup, compare
from rtl_plugin.errors import DataError, SparsityError
from rtl_plugin.integrations.audio import AudioUNet, si_snr_improvement, weighted_sdr_loss
from rtl_plugin.routing.routers import create_router
from rtl_plugin.tasks.speech.data import REAL_CORPORA, SpeechDataConfig, build_noisy_speech, load_noisy_speech
from rtl_plugin._deprecated import renamed_fields
from rtl_plugin.training.retrain import apply_loss, joint_retrain

ROUTER_FFT = 512


@renamed_fields({"search_epochs": "epochs_per_round", "rtl_retrain": "retrain_mode"})
@dataclass
class SpeechConfig:
    """Settings of one speech-enhancement run (clips of ``clip_seconds`` at 16 kHz, SNRs in dB)."""
    train_per_env: int = 96
    test_per_env: int = 32
    train_utterances: int = 96
    test_utterances: int = 32
    babble_utterances: int = 16
    real_test_per_env: int = 32          # held-out real-speech test clips per environment (0: none)
    real_noise: bool = True              # add the real sonic-pi noise clips to every environment
    noise_split: str = "types"           # train/test noise: disjoint types, or unseen instances of all types
    clip_seconds: float = 1.0
    snr_db: tuple[float, float] = (-5.0, 10.0)
    n_fft: int = 512                     # the paper: 1024 (10 s clips); 512 keeps CPU runs short
    hop_length: int = 256
    sparsities: tuple[float, ...] = (0.25, 0.5, 0.75)
    prune_fraction: float = 0.5
    warmup_steps: int = 200              # dense steps on all environments before θ0 is taken (late rewinding)
    epochs_per_round: int = 1            # passes over an environment's clips per pruning round (was search_epochs)
    retrain_epochs: int = 2
    per_ticket_state: bool = True        # RTL joint retraining: one Adam state per ticket, or one shared (False)
    # RTL retraining schedule: "sequential" (the paper: per batch index K single-ticket steps, joint_retrain)
    # or "mixed" (shuffled batches over all environments as single IMP's, each clip routed to its environment's
    # ticket, one step per batch, one Adam state: mixed_route_retrain; RTL and single IMP then differ in the masks;
    # per_ticket_state does not apply)
    retrain_mode: str = "sequential"     # was rtl_retrain
    batch_size: int = 8
    lr: float = 3e-3
    baselines: tuple[str, ...] = ("dense", "single_imp", "multi_imp")
    router: bool = True
    router_epochs: int = 200
    figures: bool = True
    seed: int = 0
    device: str = "cpu"
    progress: bool = True                # progress bars
    verbose: bool = True                 # one line per result
    cache: str | None = None             # dataset cache folder (default $RTL_CACHE or ~/.cache/rtl-plugin)
    data_file: str | None = None         # a dataset saved by speech.save_noisy_speech (machines without espeak-ng)

    @classmethod
    def quick(cls, **kw) -> "SpeechConfig":
        """A seconds-long setting for tests and ``--quick``."""
        base = dict(train_per_env=8, test_per_env=4, train_utterances=8, test_utterances=4, babble_utterances=6,
                    real_test_per_env=4, retrain_epochs=1, warmup_steps=4, router_epochs=50, progress=False, verbose=False)
        base.update(kw)
        return cls(**base)

    def validate(self) -> "SpeechConfig":
        for name in ("train_per_env", "test_per_env", "epochs_per_round", "batch_size", "router_epochs",
                     "train_utterances", "test_utterances", "babble_utterances", "n_fft", "hop_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DataError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise DataError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.real_test_per_env, int) or isinstance(self.real_test_per_env, bool) \
                or self.real_test_per_env < 0:
            raise DataError(f"real_test_per_env must be an int >= 0, got {self.real_test_per_env!r}")
        if not isinstance(self.per_ticket_state, bool):
            raise DataError(f"per_ticket_state must be True or False, got {self.per_ticket_state!r}")
        if not isinstance(self.retrain_epochs, int) or self.retrain_epochs < 0:
            raise DataError(f"retrain_epochs must be an int >= 0, got {self.retrain_epochs!r}")
        if not self.sparsities or any(not (0 <= float(s) < 1) for s in self.sparsities) \
                or list(self.sparsities) != sorted(set(self.sparsities)):
            raise SparsityError(f"sparsities must be increasing values in [0, 1), got {self.sparsities!r}")
        if not (0 < float(self.lr) < 1):
            raise DataError(f"lr must be in (0, 1), got {self.lr!r}")
        if self.retrain_mode not in ("sequential", "mixed"):
            raise DataError(f"retrain_mode must be 'sequential' or 'mixed', got {self.retrain_mode!r}")
        if self.noise_split not in ("types", "instances"):
            raise DataError(f"noise_split must be 'types' or 'instances', got {self.noise_split!r}")
        if self.data_file is not None and not isinstance(self.data_file, (str, Path)):
            raise DataError(f"data_file must be a path to a saved dataset (.npz) or None, got {self.data_file!r}")
        unknown = sorted(set(self.baselines) - {"dense", "single_imp", "multi_imp"})
        if unknown:
            raise DataError(f"unknown baselines {unknown}; choose from 'dense', 'single_imp', 'multi_imp'")
        return self

    def data_config(self):
        return SpeechDataConfig(train_per_env=self.train_per_env, test_per_env=self.test_per_env,
                                clip_seconds=self.clip_seconds, snr_db=tuple(self.snr_db),
                                train_utterances=self.train_utterances, test_utterances=self.test_utterances,
                                babble_utterances=self.babble_utterances, seed=self.seed,
                                real_noise=bool(self.real_noise), real_test_per_env=max(1, self.real_test_per_env),
                                real_corpora=REAL_CORPORA if self.real_test_per_env > 0 else (),
                                noise_split=self.noise_split)


_DATA_FIELDS = ("train_per_env", "test_per_env", "clip_seconds", "snr_db", "train_utterances", "test_utterances",
                "babble_utterances", "seed", "noise_split")


def _load_or_build(cfg: SpeechConfig):
    """The dataset of ``cfg``: read from ``cfg.data_file`` (its settings must match ``cfg``'s) or built/cached."""
    if cfg.data_file is None:
        return build_noisy_speech(cfg.data_config(), cache=cfg.cache)
    data = load_noisy_speech(cfg.data_file)
    want = cfg.data_config()
    diff = [f"{f}: file {getattr(data.config, f)!r} vs config {getattr(want, f)!r}" for f in _DATA_FIELDS
            if tuple(np.atleast_1d(getattr(data.config, f))) != tuple(np.atleast_1d(getattr(want, f)))]
    have = data.config
    if have.real_noise and not want.real_noise:
        diff.append("real_noise: file True vs config False")
    if want.real_noise and not have.real_noise:
        warnings.warn(f"data_file {cfg.data_file!r} has no real noise clips (they were not installed where it was "
                      "built); the results use synthetic noise only", stacklevel=3)
    if cfg.real_test_per_env > 0 and have.real_corpora and have.real_test_per_env != want.real_test_per_env:
        diff.append(f"real_test_per_env: file {have.real_test_per_env} vs config {want.real_test_per_env}")
    if not set(have.real_corpora) <= set(want.real_corpora):
        diff.append(f"real_corpora: file {list(have.real_corpora)} vs config {list(want.real_corpora)}")
    if diff:
        raise DataError(f"data_file {cfg.data_file!r} was built with other settings ({'; '.join(diff)}); "
                        "use the same SpeechConfig settings or save a matching dataset")
    return data


def router_features(noisy: torch.Tensor) -> torch.Tensor:
    """Label-free router input from noisy waveforms ``[B, L]`` (16 kHz): per-frequency mean and std over
    time of the log power spectrogram (n_fft 512), ``[B, 2, 257]``."""
    if not isinstance(noisy, torch.Tensor) or not noisy.is_floating_point() or noisy.dim() != 2 \
            or noisy.shape[1] < ROUTER_FFT:
        raise DataError(f"router_features expects float waveforms [B, L] with L >= {ROUTER_FFT} samples, got "
                        f"{getattr(noisy, 'shape', type(noisy).__name__)}")
    spec = torch.stft(noisy.float(), ROUTER_FFT, hop_length=ROUTER_FFT // 2,
                      window=torch.hann_window(ROUTER_FFT, device=noisy.device), return_complex=True)
    logp = torch.log10(spec.abs().pow(2) + 1e-10)  # [B, F, T]
    logp = logp - logp.mean(dim=(1, 2), keepdim=True)  # level-invariant: the SNR must not decide the route
    return torch.stack([logp.mean(-1), logp.std(-1)], dim=1)


def make_train_step():
    """``step(model, (noisy, clean), optimizer) -> loss``: weighted SDR loss on waveforms ``[B, L]``."""

    def step(model, batch, optimizer):
        noisy, clean = batch[0], batch[1]
        optimizer.zero_grad(set_to_none=True)
        return apply_loss(weighted_sdr_loss(noisy, model(noisy), clean), optimizer)
    return step


@torch.no_grad()
def _enhance(fn, noisy: torch.Tensor, extra=None, batch_size: int = 32) -> torch.Tensor:
    outs = []
    for i in range(0, noisy.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        outs.append(fn(noisy[sl], None if extra is None else extra[sl]).float().cpu())
    return torch.cat(outs)


def _per_env(values: torch.Tensor, env: torch.Tensor, K: int) -> list[float]:
    return [round(float(values[env == k].mean()), 4) for k in range(K)]


class SpeechTask(ComparisonTask):
    """Speech enhancement's pieces of the comparison protocol: environment subsets, the audio U-Net from a warmed-up
    θ0, the weighted SDR loss, SI-SNRi on every test set, and a learned router on the noisy spectrogram."""
    name = "speech_enhancement"

    def __init__(self, cfg: SpeechConfig, out_dir: Path):
        self.cfg, self.out_dir = cfg, out_dir
        self.dev = torch.device(cfg.device)
        self.t_start = time.perf_counter()
        self.train_step = make_train_step()
        self.router, self.router_info, self.route_acc, self.features = None, None, {}, {}
        self.enhanced_examples: dict[str, dict] = {}
        self.wall = {"router": 0.0}
        self._load_data()
        self._warm_up()

    def log(self, message: str) -> None:
        if self.cfg.verbose:
            print(message, flush=True)

    # ---- data
    def _load_data(self) -> None:
        cfg = self.cfg
        t = time.perf_counter()
        self.data = data = _load_or_build(cfg)
        self.wall["data"] = round(time.perf_counter() - t, 3)
        self.envs = list(data.environments)
        K = len(self.envs)
        self.x_tr, self.c_tr, self.e_tr = data.train.tensors()
        # test sets: synthetic speech x unseen noise, and (when installed) recorded speech x the same unseen noise
        self.sets = {"synthetic": data.test.tensors()}
        if data.real is not None and cfg.real_test_per_env > 0:
            self.sets["real"] = data.real.tensors()
        self.log(f"data: {len(self.x_tr)} train / {len(self.sets['synthetic'][0])} test clips of "
                 f"{self.x_tr.shape[1] / 16000:.2f} s, environments {self.envs}, real-speech test clips: "
                 f"{len(self.sets['real'][0]) if 'real' in self.sets else 'none (not installed)'} "
                 f"({self.wall['data']:.1f}s)")
        self.loaders = {k: self._loader((self.e_tr == k).nonzero().flatten(), k) for k in range(K)}
        self.all_loader = self._loader(torch.arange(len(self.x_tr)), 999)
        self.batches_per_ticket = max(len(dl) for dl in self.loaders.values())
        self.budget = self.batches_per_ticket * K  # batches per retraining epoch, equal for every method
        self.example = self.x_tr[:1].to(self.dev)
        self.X = {n: v[0].to(self.dev) for n, v in self.sets.items()}
        self.E = {n: v[2].to(self.dev) for n, v in self.sets.items()}

    def _loader(self, idx, salt: int):
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + salt)
        return DataLoader(TensorDataset(self.x_tr[idx], self.c_tr[idx]), batch_size=self.cfg.batch_size,
                          shuffle=True, generator=g)

    def ticket_loaders(self) -> dict:
        return self.loaders

    def multi_imp_loader(self, k: int):
        return CyclicLoader(self.loaders[k], self.batches_per_ticket)

    def mixed_retrain_loader(self):
        """All training clips with their environment as the route, shuffled (a fresh generator per sparsity), cycled
        for RTL's budget."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + 999)
        return CyclicLoader(DataLoader(TensorDataset(self.x_tr, self.c_tr, self.e_tr), batch_size=self.cfg.batch_size,
                                       shuffle=True, generator=g), self.budget)

    # ---- models
    def _fresh(self, seed: int) -> AudioUNet:
        torch.manual_seed(seed)
        return AudioUNet(n_fft=self.cfg.n_fft, hop_length=self.cfg.hop_length)

    def _warm_up(self) -> None:
        """θ0 shared by every method: the initialisation after a short dense warm-up on all environments
        (rewinding to an early checkpoint θ_t, as in late-rewinding IMP; warmup_steps=0 gives the initialisation)."""
        cfg, dev = self.cfg, self.dev
        t = time.perf_counter()
        warm = self._fresh(cfg.seed).to(dev)
        if cfg.warmup_steps:
            opt = torch.optim.Adam(warm.parameters(), lr=cfg.lr)
            warm.train()
            for noisy, clean in CyclicLoader(self.all_loader, cfg.warmup_steps):
                self.train_step(warm, (noisy.to(dev), clean.to(dev)), opt)
        self.theta_start = {k: v.detach().clone() for k, v in warm.state_dict().items()}
        self.wall["warmup"] = time.perf_counter() - t

    def build_routed(self, num_tickets: int):
        model = self._fresh(self.cfg.seed)
        model.load_state_dict(self.theta_start)
        return wrap(model.to(self.dev), num_tickets, example_inputs=self.example, granularity="weight")

    def after_search(self, routed, search) -> None:
        self.log(f"ticket search: {len(search.history)} rounds")
        if self.cfg.router:
            self._fit_router()

    def _fit_router(self) -> None:
        """Learned router on the noisy spectrogram (label-free inference), trained on train clips only."""
        cfg, K, envs = self.cfg, len(self.envs), self.envs
        t = time.perf_counter()
        f_tr = router_features(self.x_tr)
        features = {n: router_features(v[0]) for n, v in self.sets.items()}
        self.router = router = create_router("learned", num_tickets=K, epochs=cfg.router_epochs, weight_decay=1e-3)
        router.fit(f_tr, self.e_tr, seed=cfg.seed)
        for n, (_, _, e) in self.sets.items():
            pred = router(features[n])
            per_env = [round(float((pred[e == k] == k).float().mean()), 4) for k in range(K)]
            self.route_acc[n] = {"routing_accuracy": round(float((pred == e).float().mean()), 4),
                                 "per_env_routing_accuracy": dict(zip(envs, per_env))}
        self.features = {n: f.to(self.dev) for n, f in features.items()}
        router.to(self.dev)
        self.wall["router"] = time.perf_counter() - t
        acc = self.route_acc["synthetic"]["routing_accuracy"]
        self.router_info = {
            "name": "learned", "accuracy": acc, "per_env_accuracy": self.route_acc["synthetic"]["per_env_routing_accuracy"],
            "accuracy_by_test_set": {n: v["routing_accuracy"] for n, v in self.route_acc.items()},
            "per_env_accuracy_by_test_set": {n: v["per_env_routing_accuracy"] for n, v in self.route_acc.items()},
            "flops_per_clip": int(router.flops_per_sample(tuple(self.features["synthetic"].shape[1:]))),
            "features": "mean and std over time of the log power spectrum (n_fft 512), [2, 257]"}
        self.log(f"router learned: accuracy {acc:.3f} on test clips with unseen noise"
                 + (f", {self.route_acc['real']['routing_accuracy']:.3f} on real-speech clips"
                    if "real" in self.route_acc else ""))

    # ---- evaluation
    def _score(self, method: str, routing: str, sparsity: float, enhance, extra_by_set=None) -> Evaluation:
        """Score ``enhance(test_set_name) -> enhanced [N, L]`` on every test set; keeps the enhanced clips of the
        middle sparsity for the figures."""
        by_set, outs = {}, {}
        for name, (x, c, e) in self.sets.items():
            enhanced = enhance(name)
            imp = si_snr_improvement(x, enhanced, c)
            if not torch.isfinite(imp).all():
                raise DataError(f"{method} produced non-finite SI-SNRi; lower the learning rate")
            per = _per_env(imp, e, len(self.envs))
            by_set[name] = Evaluation(routing, {"si_snri": round(float(np.mean(per)), 4)},
                                      {"test_set": name, "per_env_si_snri": dict(zip(self.envs, per)),
                                       **(extra_by_set or {}).get(name, {})})
            self.log(f"{method:<11s} {routing:<8s} sparsity {sparsity:.2f} [{name:<9s}]: SI-SNRi "
                     f"{by_set[name].metrics['si_snri']:+.2f} dB "
                     f"({', '.join(f'{e} {v:+.2f}' for e, v in zip(self.envs, per))})")
            outs[name] = enhanced
        if routing != "learned" and method in ("rtl", "single_imp") and \
                sparsity == self.cfg.sparsities[len(self.cfg.sparsities) // 2]:
            self.enhanced_examples[method] = outs
        main = by_set.pop("synthetic")
        return Evaluation(main.routing, main.metrics, main.extras, by_set)

    def evaluate_rtl(self, routed, tickets, sparsity: float) -> list[Evaluation]:
        X, E = self.X, self.E
        out = [self._score("rtl", "context", sparsity,
                           lambda n: _enhance(lambda xb, eb: routed(xb, route=eb), X[n], E[n]))]
        if self.router is not None:
            router = self.router
            out.append(self._score("rtl", "learned", sparsity,
                                   lambda n: _enhance(lambda xb, fb: routed(xb, route=router(fb)), X[n],
                                                      self.features[n]),
                                   extra_by_set={n: {"routing_accuracy": v["routing_accuracy"]}
                                                 for n, v in self.route_acc.items()}))
        return out

    def train_dense(self) -> Evaluation:
        cfg = self.cfg
        r0 = self.build_routed(1)
        joint_retrain(r0, {0: CyclicLoader(self.all_loader, self.budget)},
                      optimizer=torch.optim.Adam(r0.parameters(), lr=cfg.lr), epochs=cfg.retrain_epochs,
                      train_step=self.train_step, device=self.dev, progress=cfg.progress)
        r0.eval()
        return self._score("dense", "none", 0.0, lambda n: _enhance(lambda xb, _: r0(xb, route=0), self.X[n]))

    def single_imp_setup(self, method: str) -> SingleImpSetup:
        """One mask over all environments, shuffled batches, same presentations (per round one pass over all)."""
        search_len = sum(len(dl) for dl in self.loaders.values())
        return SingleImpSetup(self.build_routed(1), self.all_loader, search_len, self.budget, self.train_step)

    def evaluate_single(self, routed, method: str, tickets, sparsity: float) -> Evaluation:
        return self._score(method, "none", sparsity, lambda n: _enhance(lambda xb, _: routed(xb, route=0), self.X[n]))

    def multi_imp_output(self, model, k: int) -> dict:
        """Model k's enhanced clips of environment k, per test set: ``{name: (indices, enhanced)}``."""
        out = {}
        for n, (_, _, e) in self.sets.items():
            sel = (e == k).nonzero().flatten()
            out[n] = (sel, _enhance(lambda xb, _: model(xb, route=0), self.X[n][sel.to(self.dev)]) if len(sel) else None)
        return out

    def evaluate_multi(self, outputs: list, sparsity: float) -> Evaluation:
        enhanced = {}
        for n, (x, _, _) in self.sets.items():
            enhanced[n] = torch.zeros_like(x)
            for per_set in outputs:
                sel, part = per_set[n]
                if part is not None:
                    enhanced[n][sel] = part
        return self._score("multi_imp", "context", sparsity, lambda n: enhanced[n])

    def describe(self, results: dict) -> dict:
        cfg, data, envs, K = self.cfg, self.data, self.envs, len(self.envs)
        return {
            "task": "speech_enhancement", "dataset": SPEECH_DATASET,
            "model": f"audio:unet(n_fft={cfg.n_fft},hop={cfg.hop_length})", "granularity": "weight",
            "seed": cfg.seed, "ticket_names": envs, "rows_real": results.get("rows_real", []),
            "router": self.router_info,
            "test_sets": {n: {"clips": int(len(v[0])),
                              "speech": ("synthetic (espeak-ng/flite, held-out sentences)" if n == "synthetic" else
                                         "recorded: " + ", ".join(data.config.real_corpora) + " (resampled to 16 kHz)"),
                              "noise": "the environment's TEST noise sources (unseen in training)"}
                          for n, v in self.sets.items()},
            **{key: _input_si_snr(self.sets[n], envs) if n in self.sets else None
               for key, n in (("input_si_snr_db", "synthetic"), ("input_si_snr_db_real", "real"))},
            "noise_sources": {e: {"train": sorted(set(data.train.source[data.train.env == k].tolist())),
                                  "test": sorted(set(data.test.source[data.test.env == k].tolist()))}
                              for k, e in enumerate(envs)},
            "real_speech_files": None if data.real is None else sorted(set(data.real.speech.tolist())),
            "sample_presentations_per_retrain_epoch": self.budget * cfg.batch_size,
            "targets": targets(results["rows"]),
            "targets_real": targets(results["rows_real"]) if "real" in self.sets else None,
            "wall_time_s": {k: round(v, 3) for k, v in self.wall.items()},
            "total_time_s": round(time.perf_counter() - self.t_start, 3), "config": _jsonable(asdict(cfg)),
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_threads": torch.get_num_threads(), "platform": platform.platform()}}

    def plot(self, results: dict, out_dir: Path) -> list[str] | None:
        if not self.cfg.figures:
            return None
        x_te, c_te, e_te = self.sets["synthetic"]
        examples = self.enhanced_examples
        figures = plot_speech(results, out_dir, x_te, c_te, e_te, {m: v["synthetic"] for m, v in examples.items()},
                              self.envs, self.cfg)
        if "real" in self.sets:
            figures.append(plot_speech(results, out_dir, *self.sets["real"], {m: v["real"] for m, v in examples.items()},
                                       self.envs, self.cfg, name="spectrograms_real_speech.png")[0])
        return figures


SPEECH_DATASET = ("offline-noisy-speech (espeak-ng/flite speech; sox-synthesised + sonic-pi noise; "
                  "recorded asterisk/codec2/pocketsphinx speech as a held-out test set)")


def _input_si_snr(test_set, envs) -> dict:
    """SI-SNR (dB) of the noisy input clips of one test set, mean and per environment."""
    from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio as si_snr
    x, c, e = test_set
    values = si_snr(x, c)
    return {"mean": round(float(values.mean()), 4), "per_env": dict(zip(envs, _per_env(values, e, len(envs))))}


def comparison_config(cfg: SpeechConfig) -> ComparisonConfig:
    """The protocol's settings of a speech run (no equal-storage rows: every ticket is as sparse as single IMP)."""
    baselines = tuple(m for m in ("dense", "single_imp", "multi_imp") if m in cfg.baselines)
    return ComparisonConfig(sparsities=tuple(cfg.sparsities), methods=("rtl", *baselines),
                            prune_fraction=cfg.prune_fraction, epochs_per_round=cfg.epochs_per_round,
                            retrain_epochs=cfg.retrain_epochs, lr=cfg.lr, per_ticket_state=cfg.per_ticket_state,
                            retrain_mode=cfg.retrain_mode, equal_storage=False, device=torch.device(cfg.device),
                            progress=cfg.progress)


def run_speech(config: SpeechConfig | None = None, out_dir: str | Path = "rtl-runs/speech") -> dict:
    """Run RTL against single / multi-model IMP on environment-routed speech enhancement.

    Returns the results dict (also written to ``out_dir/results.json``): rows of
    ``{method, routing, sparsity, params, matching, metrics: {si_snri}, per_env_si_snri}`` (SI-SNRi in dB,
    mean over environments of the per-clip improvement), the router's accuracy, wall times, figures.
    """
    cfg = (config if config is not None else SpeechConfig())
    if not isinstance(cfg, SpeechConfig):
        raise DataError(f"config must be a SpeechConfig, got {type(cfg).__name__}")
    cfg = cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return compare(SpeechTask(cfg, out_dir), comparison_config(cfg), out_dir)


def targets(rows: list[dict]) -> dict:
    """The issue's targets checked on the rows: RTL (context) mean SI-SNRi >= single IMP at every sparsity and
    >= multi-model IMP; learned routing within 0.2 dB of oracle (context) routing. Missing methods give None."""
    rtl, single = _si_snri_by_sparsity(rows, "rtl", "context"), _si_snri_by_sparsity(rows, "single_imp", "none")
    multi, learned = _si_snri_by_sparsity(rows, "multi_imp", "context"), _si_snri_by_sparsity(rows, "rtl", "learned")
    out = {"rtl_ge_single_imp": _rtl_at_least(rtl, single), "rtl_ge_multi_imp": _rtl_at_least(rtl, multi)}
    out["router_within_0.2db_of_oracle"] = None if not learned else {
        "met": all(rtl[s] - learned[s] <= 0.2 for s in learned),
        "gap_db": {str(s): round(rtl[s] - learned[s], 4) for s in learned}}
    return out


def _si_snri_by_sparsity(rows: list[dict], method: str, routing: str) -> dict[float, float]:
    return {r["sparsity"]: r["metrics"]["si_snri"] for r in rows if r["method"] == method and r["routing"] == routing}


def _rtl_at_least(rtl: dict, other: dict) -> dict | None:
    """Whether RTL's SI-SNRi is >= ``other``'s at every shared sparsity, with the margins (None: nothing to compare)."""
    if not other or not rtl:
        return None
    return {"met": all(rtl[s] >= other[s] for s in rtl if s in other),
            "margin_db": {str(s): round(rtl[s] - other[s], 4) for s in rtl if s in other}}


def plot_speech(results, out_dir, x_te, c_te, e_te, enhanced, envs, cfg, name: str = "spectrograms.png") -> list[str]:
    """Spectrograms (noisy / enhanced / clean, one row per environment, saved as ``name``) and SI-SNRi vs
    sparsity (only with the default ``name``); file paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir = Path(out_dir)
    paths = []
    methods = [m for m in ("rtl", "single_imp") if m in enhanced]
    cols = ["noisy", *[f"enhanced ({m})" for m in methods], "clean"]
    fig, axes = plt.subplots(len(envs), len(cols), figsize=(3.2 * len(cols), 2.4 * len(envs)), squeeze=False)
    win = torch.hann_window(ROUTER_FFT)
    for k, env in enumerate(envs):
        i = int((e_te == k).nonzero().flatten()[0])
        waves = [x_te[i], *[enhanced[m][i] for m in methods], c_te[i]]
        for j, (w, title) in enumerate(zip(waves, cols)):
            spec = torch.stft(w.float(), ROUTER_FFT, hop_length=128, window=win, return_complex=True).abs()
            db = 20 * torch.log10(spec + 1e-6)
            ax = axes[k, j]
            ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=float(db.max()) - 80,
                      extent=[0, w.shape[0] / 16000, 0, 8])
            ax.set_title(f"{env}: {title}", fontsize=8)
            ax.set_xlabel("time (s)", fontsize=7)
            ax.set_ylabel("kHz", fontsize=7)
            ax.tick_params(labelsize=6)
    what = "recorded speech" if "real" in name else "synthetic speech"
    fig.suptitle(f"test clips ({what}, unseen noise), sparsity {cfg.sparsities[len(cfg.sparsities) // 2]}",
                 fontsize=9)
    fig.tight_layout()
    p = out_dir / name
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(str(p))
    if name != "spectrograms.png":
        return paths

    fig, ax = plt.subplots(figsize=(5, 3.5))
    keys = []
    for r in results["rows"]:
        if r["method"] != "dense" and (r["method"], r["routing"]) not in keys:
            keys.append((r["method"], r["routing"]))
    for m, rt in keys:
        pts = sorted((r["sparsity"], r["metrics"]["si_snri"]) for r in results["rows"] if (r["method"], r["routing"]) == (m, rt))
        ax.plot([100 * s for s, _ in pts], [v for _, v in pts], marker="o", label=f"{m} ({rt})")
    for r in results["rows"]:
        if r["method"] == "dense":
            ax.axhline(r["metrics"]["si_snri"], color="gray", ls="--", label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("SI-SNRi (dB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "si_snri_vs_sparsity.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(str(p))
    return paths


def format_speech_table(results: dict, test_set: str = "synthetic") -> str:
    """Methods x sparsities: mean SI-SNRi (dB) / #params, like the paper's table (``test_set``: ``synthetic``
    or ``real``, the recorded-speech mixtures)."""
    if test_set not in ("synthetic", "real"):
        raise DataError(f"test_set must be 'synthetic' or 'real', got {test_set!r}.")
    rows = results["rows"] if test_set == "synthetic" else results.get("rows_real") or []
    sps = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
    keys = []
    for r in rows:
        if (r["method"], r["routing"]) not in keys:
            keys.append((r["method"], r["routing"]))
    lines = ["| method | routing | " + " | ".join(f"{int(round(100 * s))}%" for s in sps) + " |",
             "|---|---|" + "---|" * len(sps)]
    for m, rt in keys:
        cells = []
        for s in sps:
            hit = [r for r in rows if (r["method"], r["routing"]) == (m, rt) and (r["sparsity"] == s or m == "dense")]
            cells.append(f"{hit[0]['metrics']['si_snri']:.2f} / {hit[0]['params'] / 1e3:.1f}K" if hit else "-")
        lines.append(f"| {m} | {rt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _jsonable(obj):
    import json
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


__all__ = ["SpeechConfig", "run_speech", "router_features", "make_train_step", "targets", "plot_speech",
           "format_speech_table"]
