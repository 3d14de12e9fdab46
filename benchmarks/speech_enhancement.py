"""Speech enhancement with one ticket per acoustic environment (paper §4, issue #6): RTL vs single IMP vs
multi-model IMP (and dense) at 25/50/75% sparsity, SI-SNRi in dB, plus a learned environment router.

    python benchmarks/speech_enhancement.py            # 96 train / 32 test 1-s clips per environment (~10 min, 2 CPU cores)
    python benchmarks/speech_enhancement.py --quick    # 8 / 4 clips per environment, < 1 min

Needs espeak-ng and sox (apt-get install espeak-ng sox; flite optional); real noise clips and the held-out
real-speech test set need apt-get install libsox-fmt-all sonic-pi-samples asterisk-core-sounds-en-wav
codec2-examples pocketsphinx-testdata (skipped with a warning when absent; --require-real makes it an error).
Writes benchmarks/results/speech_enhancement.json and figures under benchmarks/results/speech_enhancement/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch initialises OpenMP (shared CPUs)

import torch  # noqa: E402

from rtl_plugin._deprecated import add_deprecated_flag  # noqa: E402
from rtl_plugin.tasks.speech.runner import SpeechConfig, format_speech_table, run_speech  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny data and one retraining epoch, < 1 min")
    ap.add_argument("--train-per-env", type=int, default=None)
    ap.add_argument("--test-per-env", type=int, default=None)
    ap.add_argument("--epochs-per-round", type=int, default=None, help="passes over an environment per round")
    add_deprecated_flag(ap, "--search-epochs", "--epochs-per-round", type=int)
    ap.add_argument("--retrain-epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--n-fft", type=int, default=None)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--real-test-per-env", type=int, default=None, help="recorded-speech test clips per environment")
    ap.add_argument("--no-real-noise", action="store_true", help="synthetic noise sources only")
    ap.add_argument("--require-real", action="store_true", help="fail when the real recordings are not installed")
    ap.add_argument("--shared-state", action="store_true",
                    help="RTL joint retraining with one Adam state shared by the tickets (default: one per ticket)")
    ap.add_argument("--retrain-mode", choices=("sequential", "mixed"), default="sequential",
                    help="RTL retraining: the paper's K sequential single-ticket steps per batch index (sequential) "
                         "or single IMP's shuffled all-environment batches with each clip routed to its ticket (mixed)")
    add_deprecated_flag(ap, "--rtl-retrain", "--retrain-mode", choices=("sequential", "mixed"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="a dataset file written by speech.save_noisy_speech (for machines "
                                                 "without espeak-ng / sox, e.g. the GPU machine)")
    ap.add_argument("--noise-split", choices=("types", "instances"), default="types",
                    help="test noise: source types never heard in training (types) or unseen recordings / renders "
                         "of the environment's types (instances)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true", help="progress bars")
    ap.add_argument("--out", default=str(HERE / "results" / "speech_enhancement.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    kw = {k: v for k, v in dict(train_per_env=args.train_per_env, test_per_env=args.test_per_env,
                                epochs_per_round=args.epochs_per_round, retrain_epochs=args.retrain_epochs,
                                batch_size=args.batch_size, lr=args.lr, n_fft=args.n_fft,
                                warmup_steps=args.warmup_steps,
                                real_test_per_env=args.real_test_per_env).items() if v is not None}
    if args.no_real_noise:
        kw["real_noise"] = False
    kw["retrain_mode"] = args.retrain_mode
    if args.shared_state:
        kw["per_ticket_state"] = False
    kw["noise_split"] = args.noise_split
    if args.data:
        kw["data_file"] = args.data
    kw.update(seed=args.seed, device=args.device, progress=args.progress, verbose=True)
    cfg = SpeechConfig.quick(**kw) if args.quick else SpeechConfig(**kw)
    if args.require_real and args.data:
        from rtl_plugin.tasks.speech.data import load_noisy_speech
        d = load_noisy_speech(args.data)
        if not d.config.real_noise or d.real is None:
            raise SystemExit(f"--require-real: {args.data} was built without the real noise clips or the real-speech "
                             "test set; rebuild it where they are installed")
    elif args.require_real:
        from rtl_plugin.tasks.speech.data import build_noisy_speech
        build_noisy_speech(cfg.data_config(), cache=cfg.cache, require_real=True)  # raises with the apt line
    t0 = time.perf_counter()
    res = run_speech(cfg, out.parent / out.stem)
    res["command"] = "python benchmarks/speech_enhancement.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res["benchmark_wall_s"] = round(time.perf_counter() - t0, 1)
    res["threads"] = args.threads
    out.parent.mkdir(parents=True, exist_ok=True)
    from rtl_plugin.persist.io import atomic_write_json
    atomic_write_json(out, res)
    print("synthetic-speech test mixtures (mean SI-SNRi dB / params):")
    print(format_speech_table(res))
    if res.get("rows_real"):
        print("real-speech test mixtures (recorded speech, unseen noise):")
        print(format_speech_table(res, "real"))
    if res.get("router"):
        print(f"router accuracy (unseen noise): {json.dumps(res['router']['accuracy_by_test_set'])}")
    print("targets (synthetic):", json.dumps(res["targets"]))
    print("targets (real speech):", json.dumps(res["targets_real"]))
    print(f"wall {res['benchmark_wall_s']} s -> {out}")
    return res


if __name__ == "__main__":
    main()
