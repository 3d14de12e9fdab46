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

import copy
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rtl_plugin.errors import DataError, SparsityError

ROUTER_FFT = 512


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
    search_epochs: int = 1               # passes over an environment's clips per pruning round
    retrain_epochs: int = 2
    per_ticket_state: bool = True        # RTL joint retraining: one Adam state per ticket, or one shared (False)
    # RTL retraining schedule: "sequential" (the paper: per batch index K single-ticket steps, joint_retrain)
    # or "mixed" (shuffled batches over all environments as single IMP's, each clip routed to its environment's
    # ticket, one step per batch, one Adam state: mixed_route_retrain; RTL and single IMP then differ in the masks;
    # per_ticket_state does not apply)
    rtl_retrain: str = "sequential"
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
        for name in ("train_per_env", "test_per_env", "search_epochs", "batch_size", "router_epochs",
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
        if self.rtl_retrain not in ("sequential", "mixed"):
            raise DataError(f"rtl_retrain must be 'sequential' or 'mixed', got {self.rtl_retrain!r}")
        if self.noise_split not in ("types", "instances"):
            raise DataError(f"noise_split must be 'types' or 'instances', got {self.noise_split!r}")
        if self.data_file is not None and not isinstance(self.data_file, (str, Path)):
            raise DataError(f"data_file must be a path to a saved dataset (.npz) or None, got {self.data_file!r}")
        unknown = sorted(set(self.baselines) - {"dense", "single_imp", "multi_imp"})
        if unknown:
            raise DataError(f"unknown baselines {unknown}; choose from 'dense', 'single_imp', 'multi_imp'")
        return self

    def data_config(self):
        from rtl_plugin.tasks.speech.data import REAL_CORPORA, SpeechDataConfig
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
    from rtl_plugin.tasks.speech.data import build_noisy_speech, load_noisy_speech
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
    from rtl_plugin.integrations.audio import weighted_sdr_loss
    from rtl_plugin.training.retrain import apply_loss

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


def run_speech(config: SpeechConfig | None = None, out_dir: str | Path = "rtl-runs/speech") -> dict:
    """Run RTL against single / multi-model IMP on environment-routed speech enhancement.

    Returns the results dict (also written to ``out_dir/results.json``): rows of
    ``{method, routing, sparsity, params, matching, metrics: {si_snri}, per_env_si_snri}`` (SI-SNRi in dB,
    mean over environments of the per-clip improvement), the router's accuracy, wall times, figures.
    """
    from rtl_plugin import wrap
    from rtl_plugin.comparison.baselines import CyclicLoader
    from rtl_plugin.integrations.audio import AudioUNet, si_snr_improvement
    from rtl_plugin.pruning.pruner import RTLPruner
    from rtl_plugin.training.retrain import joint_retrain, retrain_tickets
    from torch.utils.data import DataLoader, TensorDataset

    cfg = (config if config is not None else SpeechConfig())
    if not isinstance(cfg, SpeechConfig):
        raise DataError(f"config must be a SpeechConfig, got {type(cfg).__name__}")
    cfg = cfg.validate()
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg.device)
    log = (lambda m: print(m, flush=True)) if cfg.verbose else (lambda m: None)

    t = time.perf_counter()
    data = _load_or_build(cfg)
    t_data = time.perf_counter() - t
    envs = list(data.environments)
    K = len(envs)
    x_tr, c_tr, e_tr = data.train.tensors()
    x_te, c_te, e_te = data.test.tensors()
    L = x_tr.shape[1]
    # test sets: synthetic speech x unseen noise, and (when installed) recorded speech x the same unseen noise
    sets = {"synthetic": (x_te, c_te, e_te)}
    if data.real is not None and cfg.real_test_per_env > 0:
        sets["real"] = data.real.tensors()
    log(f"data: {len(x_tr)} train / {len(x_te)} test clips of {L / 16000:.2f} s, environments {envs}, "
        f"real-speech test clips: {len(sets['real'][0]) if 'real' in sets else 'none (not installed)'} "
        f"({t_data:.1f}s)")

    def loader(idx, salt):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + salt)
        return DataLoader(TensorDataset(x_tr[idx], c_tr[idx]), batch_size=cfg.batch_size, shuffle=True, generator=g)

    loaders = {k: loader((e_tr == k).nonzero().flatten(), k) for k in range(K)}
    all_loader = loader(torch.arange(len(x_tr)), 999)

    def mixed_loader():
        """All training clips with their environment as the route, shuffled (a fresh generator per sparsity)."""
        g = torch.Generator().manual_seed(cfg.seed * 1000 + 999)
        return DataLoader(TensorDataset(x_tr, c_tr, e_tr), batch_size=cfg.batch_size, shuffle=True, generator=g)
    M = max(len(dl) for dl in loaders.values())
    budget = M * K  # sample presentations (batches) per retraining epoch, equal for every method
    step = make_train_step()

    def fresh(seed: int) -> AudioUNet:
        torch.manual_seed(seed)
        return AudioUNet(n_fft=cfg.n_fft, hop_length=cfg.hop_length)

    # ---- θ0 shared by every method: the initialisation after a short dense warm-up on all environments
    # (rewinding to an early checkpoint θ_t, as in late-rewinding IMP; warmup_steps=0 gives the initialisation)
    t = time.perf_counter()
    warm = fresh(cfg.seed).to(dev)
    if cfg.warmup_steps:
        opt = torch.optim.Adam(warm.parameters(), lr=cfg.lr)
        warm.train()
        for noisy, clean in CyclicLoader(all_loader, cfg.warmup_steps):
            step(warm, (noisy.to(dev), clean.to(dev)), opt)
    theta_start = {k: v.detach().clone() for k, v in warm.state_dict().items()}
    wall_warmup = time.perf_counter() - t
    del warm

    def make(seed: int) -> AudioUNet:
        m = fresh(seed)
        m.load_state_dict(theta_start)
        return m

    def opt_factory(params):
        return torch.optim.Adam(params, lr=cfg.lr)

    example = x_tr[:1].to(dev)
    X = {n: v[0].to(dev) for n, v in sets.items()}
    E = {n: v[2].to(dev) for n, v in sets.items()}
    from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio as si_snr
    input_si_snr = {n: si_snr(v[0], v[1]) for n, v in sets.items()}  # dB, per clip
    rows_by: dict[str, list[dict]] = {n: [] for n in sets}
    rows = rows_by["synthetic"]
    wall = {"data": round(t_data, 3), "warmup": wall_warmup, "ticket_search": 0.0, "joint_retrain": 0.0, "single_imp": 0.0,
            "multi_imp": 0.0, "dense": 0.0, "router": 0.0}
    enhanced_examples: dict[str, dict] = {}

    def row(method, routing, sparsity, params, enhance, extra_by_set=None, **extra):
        """Score ``enhance(test_set_name) -> enhanced [N, L]`` on every test set; {test set: enhanced}."""
        outs = {}
        for name, (x, c, e) in sets.items():
            enhanced = enhance(name)
            imp = si_snr_improvement(x, enhanced, c)
            if not torch.isfinite(imp).all():
                raise DataError(f"{method} produced non-finite SI-SNRi; lower the learning rate")
            per = _per_env(imp, e, K)
            r = {"method": method, "routing": routing, "sparsity": sparsity, "params": int(params),
                 "matching": "equal_cost", "test_set": name, "metrics": {"si_snri": round(float(np.mean(per)), 4)},
                 "per_env_si_snri": dict(zip(envs, per))}
            r.update(extra)
            r.update((extra_by_set or {}).get(name, {}))
            rows_by[name].append(r)
            log(f"{method:<11s} {routing:<8s} sparsity {sparsity:.2f} [{name:<9s}]: SI-SNRi "
                f"{r['metrics']['si_snri']:+.2f} dB ({', '.join(f'{e} {v:+.2f}' for e, v in zip(envs, per))})")
            outs[name] = enhanced
        return outs

    # ---- RTL ticket search (per-environment IMP from θ0)
    routed = wrap(make(cfg.seed).to(dev), K, example_inputs=example, granularity="weight")
    theta0 = copy.deepcopy(routed.model.state_dict())
    n_total = routed.space.num_weights
    pruner = RTLPruner(routed, target_sparsity=list(cfg.sparsities), prune_fraction=cfg.prune_fraction,
                       progress=cfg.progress)
    t = time.perf_counter()
    search = pruner.find_tickets(loaders, train_step=step, epochs_per_round=cfg.search_epochs,
                                 optimizer_factory=opt_factory, device=dev)
    wall["ticket_search"] = time.perf_counter() - t
    log(f"ticket search: {len(search.history)} rounds in {wall['ticket_search']:.1f}s")

    # ---- learned router on the noisy spectrogram (label-free inference), trained on train clips only
    router_info = None
    F: dict[str, torch.Tensor] = {}
    route_acc: dict[str, dict] = {}
    if cfg.router:
        from rtl_plugin.routing.routers import create_router
        t = time.perf_counter()
        f_tr = router_features(x_tr)
        F = {n: router_features(v[0]) for n, v in sets.items()}
        router = create_router("learned", num_tickets=K, epochs=cfg.router_epochs, weight_decay=1e-3)
        router.fit(f_tr, e_tr, seed=cfg.seed)
        for n, (_, _, e) in sets.items():
            pred = router(F[n])
            route_acc[n] = {"routing_accuracy": round(float((pred == e).float().mean()), 4),
                            "per_env_routing_accuracy": dict(zip(envs, [round(float((pred[e == k] == k).float().mean()), 4)
                                                                        for k in range(K)]))}
        F = {n: f.to(dev) for n, f in F.items()}
        router.to(dev)
        wall["router"] = time.perf_counter() - t
        acc = route_acc["synthetic"]["routing_accuracy"]
        router_info = {"name": "learned", "accuracy": acc,
                       "per_env_accuracy": route_acc["synthetic"]["per_env_routing_accuracy"],
                       "accuracy_by_test_set": {n: v["routing_accuracy"] for n, v in route_acc.items()},
                       "per_env_accuracy_by_test_set": {n: v["per_env_routing_accuracy"] for n, v in route_acc.items()},
                       "flops_per_clip": int(router.flops_per_sample(tuple(F["synthetic"].shape[1:]))),
                       "features": "mean and std over time of the log power spectrum (n_fft 512), [2, 257]"}
        log(f"router learned: accuracy {acc:.3f} on test clips with unseen noise"
            + (f", {route_acc['real']['routing_accuracy']:.3f} on real-speech clips" if "real" in route_acc else ""))

    # ---- RTL joint retraining per target sparsity
    sim = []
    mid = cfg.sparsities[len(cfg.sparsities) // 2]
    for s in cfg.sparsities:
        tickets = search.tickets_at[s]
        if cfg.rtl_retrain == "mixed":
            retrain_data, extra = CyclicLoader(mixed_loader(), budget), {}
        else:
            retrain_data, extra = loaders, {"per_ticket_state": cfg.per_ticket_state}
        wall["joint_retrain"] += retrain_tickets(routed, theta0, tickets, retrain_data, lr=cfg.lr, epochs=cfg.retrain_epochs,
                                                 schedule=cfg.rtl_retrain, train_step=step, device=dev,
                                                 progress=cfg.progress, **extra)
        from rtl_plugin.diagnostics.similarity import mean_offdiagonal
        sim.append({"sparsity": s, "mean_jaccard": round(mean_offdiagonal(tickets.jaccard()), 6),
                    "union": int(tickets.union_count())})
        enh = row("rtl", "context", s, tickets.union_count(),
                  lambda n: _enhance(lambda xb, eb: routed(xb, route=eb), X[n], E[n]),
                  per_ticket_params=[int(v) for v in tickets.kept()])
        if s == mid:
            enhanced_examples["rtl"] = enh
        if router_info is not None:
            row("rtl", "learned", s, tickets.union_count(),
                lambda n: _enhance(lambda xb, fb: routed(xb, route=router(fb)), X[n], F[n]),
                extra_by_set={n: {"routing_accuracy": v["routing_accuracy"]} for n, v in route_acc.items()})
        routed.train()

    # ---- dense reference
    if "dense" in cfg.baselines:
        t = time.perf_counter()
        r0 = wrap(make(cfg.seed).to(dev), 1, example_inputs=example)
        joint_retrain(r0, {0: CyclicLoader(all_loader, budget)}, optimizer=torch.optim.Adam(r0.parameters(), lr=cfg.lr),
                      epochs=cfg.retrain_epochs, train_step=step, device=dev, progress=cfg.progress)
        r0.eval()
        row("dense", "none", 0.0, n_total, lambda n: _enhance(lambda xb, _: r0(xb, route=0), X[n]))
        wall["dense"] = time.perf_counter() - t

    # ---- single-mask IMP: one mask over all environments, shuffled batches, same presentations
    if "single_imp" in cfg.baselines:
        t = time.perf_counter()
        r1 = wrap(make(cfg.seed).to(dev), 1, example_inputs=example)
        theta1 = copy.deepcopy(r1.model.state_dict())
        p1 = RTLPruner(r1, target_sparsity=list(cfg.sparsities), prune_fraction=cfg.prune_fraction,
                       progress=cfg.progress)
        search_len = sum(len(dl) for dl in loaders.values())  # per round one pass over all environments
        res1 = p1.find_tickets({0: CyclicLoader(all_loader, search_len)}, train_step=step,
                               epochs_per_round=cfg.search_epochs, optimizer_factory=opt_factory, device=dev)
        for s in cfg.sparsities:
            retrain_tickets(r1, theta1, res1.tickets_at[s], {0: CyclicLoader(all_loader, budget)}, lr=cfg.lr,
                            epochs=cfg.retrain_epochs, train_step=step, device=dev, progress=cfg.progress)
            enh = row("single_imp", "none", s, int(res1.tickets_at[s].kept()[0]),
                      lambda n: _enhance(lambda xb, _: r1(xb, route=0), X[n]))
            if s == mid:
                enhanced_examples["single_imp"] = enh
            r1.train()
        wall["single_imp"] = time.perf_counter() - t

    # ---- multi-model IMP: K independent models; per-environment IMP from the same θ0 gives exactly the masks
    # of RTL's ticket search (each round rewinds to θ0), so they are reused; each model retrains alone.
    if "multi_imp" in cfg.baselines:
        from rtl_plugin.tasks.classification.runner import _single_ticket
        t = time.perf_counter()
        for s in cfg.sparsities:
            tickets = search.tickets_at[s]
            models = []
            for k in range(K):
                mk = wrap(make(cfg.seed).to(dev), 1, example_inputs=example)
                mk.set_tickets(_single_ticket(mk.space, tickets, k))
                joint_retrain(mk, {0: CyclicLoader(loaders[k], M)}, optimizer=torch.optim.Adam(mk.parameters(), lr=cfg.lr),
                              epochs=cfg.retrain_epochs, train_step=step, device=dev, progress=False)
                mk.eval()
                models.append(mk)

            def multi(n, models=models):
                enh = torch.zeros_like(sets[n][0])
                for k, mk in enumerate(models):
                    sel = (sets[n][2] == k).nonzero().flatten()
                    if len(sel):
                        enh[sel] = _enhance(lambda xb, _: mk(xb, route=0), X[n][sel.to(dev)])
                return enh
            row("multi_imp", "context", s, int(tickets.kept().sum()), multi)
            del models
        wall["multi_imp"] = time.perf_counter() - t + wall["ticket_search"]

    results = {
        "task": "speech_enhancement", "dataset": "offline-noisy-speech (espeak-ng/flite speech; sox-synthesised + sonic-pi noise; "
                   "recorded asterisk/codec2/pocketsphinx speech as a held-out test set)",
        "model": f"audio:unet(n_fft={cfg.n_fft},hop={cfg.hop_length})", "granularity": "weight",
        "num_tickets": K, "seed": cfg.seed, "device": str(dev), "ticket_names": envs, "prunable_weights": n_total,
        "rows": rows, "rows_real": rows_by.get("real", []), "similarity": sim, "router": router_info,
        "test_sets": {n: {"clips": int(len(v[0])),
                          "speech": ("synthetic (espeak-ng/flite, held-out sentences)" if n == "synthetic" else
                                     "recorded: " + ", ".join(data.config.real_corpora) + " (resampled to 16 kHz)"),
                          "noise": "the environment's TEST noise sources (unseen in training)"} for n, v in sets.items()},
        "input_si_snr_db": {"mean": round(float(input_si_snr["synthetic"].mean()), 4),
                            "per_env": dict(zip(envs, _per_env(input_si_snr["synthetic"], e_te, K)))},
        "input_si_snr_db_real": None if "real" not in sets else {
            "mean": round(float(input_si_snr["real"].mean()), 4),
            "per_env": dict(zip(envs, _per_env(input_si_snr["real"], sets["real"][2], K)))},
        "noise_sources": {e: {"train": sorted(set(data.train.source[data.train.env == k].tolist())),
                              "test": sorted(set(data.test.source[data.test.env == k].tolist()))}
                          for k, e in enumerate(envs)},
        "real_speech_files": None if data.real is None else sorted(set(data.real.speech.tolist())),
        "sample_presentations_per_retrain_epoch": budget * cfg.batch_size,
        "targets": targets(rows),
        "targets_real": targets(rows_by["real"]) if "real" in rows_by else None,
        "wall_time_s": {k: round(v, 3) for k, v in wall.items()},
        "total_time_s": None,
        "config": _jsonable(asdict(cfg)),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
    }
    if cfg.figures:
        try:
            results["figures"] = plot_speech(results, out_dir, x_te, c_te, e_te,
                                             {m: v["synthetic"] for m, v in enhanced_examples.items()}, envs, cfg)
            if "real" in sets:
                results["figures"].append(plot_speech(
                    results, out_dir, *sets["real"], {m: v["real"] for m, v in enhanced_examples.items()}, envs, cfg,
                    name="spectrograms_real_speech.png")[0])
        except ImportError as e:  # matplotlib missing: results stay valid without figures
            log(f"figures skipped ({e}); pip install 'rtl-plugin[plots]'")
    results["total_time_s"] = round(time.perf_counter() - t_start, 3)
    from rtl_plugin.persist.io import atomic_write_json
    atomic_write_json(out_dir / "results.json", results)
    return results


def targets(rows: list[dict]) -> dict:
    """The issue's targets checked on the rows: RTL (context) mean SI-SNRi >= single IMP at every sparsity and
    >= multi-model IMP; learned routing within 0.2 dB of oracle (context) routing. Missing methods give None."""
    def get(method, routing):
        return {r["sparsity"]: r["metrics"]["si_snri"] for r in rows if r["method"] == method and r["routing"] == routing}
    rtl, single, multi, learned = get("rtl", "context"), get("single_imp", "none"), get("multi_imp", "context"), get("rtl", "learned")

    def cmp(other, fn):
        if not other or not rtl:
            return None
        return {"met": all(fn(rtl[s], other[s]) for s in rtl if s in other),
                "margin_db": {str(s): round(rtl[s] - other[s], 4) for s in rtl if s in other}}
    out = {"rtl_ge_single_imp": cmp(single, lambda a, b: a >= b), "rtl_ge_multi_imp": cmp(multi, lambda a, b: a >= b)}
    out["router_within_0.2db_of_oracle"] = None if not learned else {
        "met": all(rtl[s] - learned[s] <= 0.2 for s in learned),
        "gap_db": {str(s): round(rtl[s] - learned[s], 4) for s in learned}}
    return out


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
