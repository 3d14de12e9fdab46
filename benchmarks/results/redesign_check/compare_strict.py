import json, sys, math, pathlib
SKIP = ("time", "wall", "machine", "commit", "path", "dir", "date", "seconds", "command", "tickets", "figures", "out", "host", "elapsed", "_s")
def walk(a, b, where, diffs):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if any(s in k.lower() for s in SKIP): continue
            if k not in a or k not in b: diffs.append(f"{where}.{k}: only in {'new' if k in b else 'base'}"); continue
            walk(a[k], b[k], f"{where}.{k}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b): diffs.append(f"{where}: len {len(a)} vs {len(b)}"); return
        for i, (x, y) in enumerate(zip(a, b)): walk(x, y, f"{where}[{i}]", diffs)
    elif isinstance(a, float) and isinstance(b, float):
        if not (a == b or (math.isnan(a) and math.isnan(b))): diffs.append(f"{where}: {a} vs {b}")
    elif isinstance(a, str) and isinstance(b, str) and "Wall time" in a:
        if a.split("Wall time")[0] != b.split("Wall time")[0]: diffs.append(f"{where}: markdown differs")
    elif a != b:
        diffs.append(f"{where}: {a!r} vs {b!r}")
base, new = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for name in ["demo/results.json", "fashion_detectors.json", "inr_regions.json", "segmentation_mosaic.json", "speech_enhancement.json", "collapse_sweep.json"]:
    try:
        a = json.loads((base / name).read_text()); b = json.loads((new / name).read_text())
    except Exception as e:
        print(f"{name}: ERROR {e}"); continue
    d = []; walk(a, b, "", d)
    print(f"{name}: {'IDENTICAL' if not d else str(len(d)) + ' differences'}")
    for x in d[:15]: print("   ", x)
