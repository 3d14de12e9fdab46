# /tmp/compare.py, except that keys ADDED on purpose to reach the common results schema are allowed (listed, not
# counted as differences): similarity[i].chance/.intersection, rows[i].matching/.metrics (INR, segmentation rows now
# also hold metrics: {psnr|miou}), and the schema's top-level dataset/model/granularity/seed/device/num_tickets.
# A key that is missing in the new output, or any changed value, is still a difference.
ALLOWED = {"similarity": ("chance", "intersection"), "rows": ("matching", "metrics", "per_ticket_params"),
           "top": ("dataset", "model", "granularity", "seed", "device", "num_tickets", "prunable_weights")}
RENAMED = {"search_epochs": "epochs_per_round", "rtl_retrain": "retrain_mode", "n_clusters": "num_clusters"}
src = open(__import__("os").path.join(__import__("os").path.dirname(__file__), "compare_strict.py")).read()
src = src.replace("""    if isinstance(a, dict) and isinstance(b, dict):
""", """    if isinstance(a, dict) and isinstance(b, dict):
        a = {RENAMED.get(k, k) if RENAMED.get(k) in b and k not in b else k: v for k, v in a.items()}
""")
src = src.replace("""            if k not in a or k not in b: diffs.append""", """            if k not in a and allowed_new(where, k): added.add(k); continue
            if k not in a or k not in b: diffs.append""")
src = src.replace("""    print(f"{name}: {'IDENTICAL' if not d else str(len(d)) + ' differences'}")""", """    print(f"{name}: {'IDENTICAL' if not d else str(len(d)) + ' differences'}" + (f" (added schema keys: {sorted(added)})" if added else ""))""")
src = src.replace("""    d = []; walk(a, b, "", d)""", """    d = []; added.clear(); walk(a, b, "", d)""")
head = '''import re
added = set()
ALLOWED = %r
def allowed_new(where, k):
    last = re.sub(r"\\[\\d+\\]$", "", where.rsplit(".", 1)[-1]) if where else ""
    if last in ("similarity", "rows", "rows_real"):
        return k in ALLOWED["similarity" if last == "similarity" else "rows"]
    return k in ALLOWED["top"] and (where == "" or re.fullmatch(r"\\.(images|runs|per_seed)(\\[\\d+\\]|\\.[\\w-]+)", where) is not None)
''' % (ALLOWED,)
exec(compile("RENAMED = " + repr(RENAMED) + "\n" + head + src, "/tmp/compare.py", "exec"))
