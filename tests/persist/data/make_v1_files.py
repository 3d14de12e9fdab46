"""Writes tests/persist/data/v1/: a saved model, two packages and a checkpoint bundle in format version 1.

Run once with an rtl-plugin tree on PYTHONPATH (the files in v1/ were written by commit 37e7b22, before the
manifest code was unified); tests/persist/test_manifest.py checks that today's code still reads them.
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for _helpers
import rtl_plugin as rtl  # noqa: E402
from rtl_plugin.persist.checkpoint import save_bundle  # noqa: E402
from rtl_plugin.persist.package import export_package  # noqa: E402
from rtl_plugin.routing.routers import create_router  # noqa: E402
from _helpers import TinyCNN, half_tickets  # noqa: E402

out = Path(sys.argv[1])
x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5))
route = torch.tensor([0, 1, 2, 0, 1, 2])
expected = {"x": x, "route": route}
for gran in ("weight", "channel"):
    torch.manual_seed(0)
    r = rtl.wrap(TinyCNN(), 3, example_inputs=torch.randn(1, 3, 8, 8), granularity=gran, adapter="generic",
                 output_layers=["head"])
    r.set_tickets(half_tickets(r.space, 3, seed=1) if gran == "channel" else rtl.TicketSet.random(r.space, 3, keep=0.5, seed=1))
    r.eval()
    router = create_router("centroid", num_tickets=3, input_shape=(3, 8, 8)).fit(x, route)
    r.save(out / f"model_{gran}", extra={"note": "v1"})
    export_package(r, out / f"package_{gran}", router=router, example_inputs=x)
    with torch.no_grad():
        expected[f"y_{gran}"] = r(x, route=route)
save_file(expected, str(out / "expected.safetensors"))
save_bundle(out / "checkpoint", "search", {"a": torch.arange(4)}, {"epoch": 3}, config={"c": 1})
