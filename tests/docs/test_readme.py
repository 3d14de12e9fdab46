"""The README's API block runs as written (on tiny stand-in data)."""
import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

README = Path(__file__).resolve().parents[2] / "README.md"


def _api_block() -> str:
    text = README.read_text()
    section = text.split("## The API in 30 lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_has_exactly_two_commands():
    text = README.read_text()
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    cmds = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert len(cmds) == 2
    assert cmds[0].strip().endswith("rtl demo")
    ci = (README.parent / ".ci" / "run").read_text()
    assert cmds[1].strip() in ci  # CI runs the README's test command, same words


def test_readme_api_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)

    def loader(shift):
        x = torch.randn(16, 3, 32, 32, generator=g) + shift
        return DataLoader(TensorDataset(x, torch.randint(0, 22, (16,), generator=g)), batch_size=16)

    x = torch.randn(6, 3, 32, 32, generator=g)
    env = {"loader_digits": loader(0.0), "loader_mnist": loader(1.0), "loader_faces": loader(-1.0),
           "x": x, "domain_ids": torch.tensor([0, 1, 2, 2, 1, 0]),
           "x_train": torch.cat([x + 0.0, x + 1.0, x - 1.0]), "domain_train": torch.arange(3).repeat_interleave(6)}
    # same code on a smaller timm model and one retraining epoch, to keep the suite fast
    code = _api_block().replace("epochs=10", "epochs=1").replace("\"resnet18\"", "\"test_resnet\"")
    exec(compile(code, str(README), "exec"), env)
    routed, routed2 = env["routed"], env["routed2"]
    assert env["logits"].shape == (6, 22)
    assert abs(float(routed.tickets.sparsity().mean()) - 0.75) < 1e-6
    routed.eval()
    routed2.eval()
    with torch.no_grad():
        assert torch.equal(routed(x, route=env["domain_ids"]), routed2(x, route=env["domain_ids"]))


def test_readme_collapse_block_runs(tmp_path, monkeypatch):
    import rtl_plugin as rtl
    from _helpers import TinyCNN

    monkeypatch.chdir(tmp_path)
    text = README.read_text()
    section = text.split("## Collapse diagnostics", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    routed = rtl.wrap(TinyCNN(), 2, example_inputs=torch.randn(1, 3, 8, 8), adapter="generic",
                      output_layers=["head"])
    subsets = {k: DataLoader(TensorDataset(torch.randn(8, 3, 8, 8, generator=g) + k,
                                           torch.randint(0, 5, (8,), generator=g)), batch_size=8) for k in range(2)}
    env = {"rtl": rtl, "routed": routed, "subsets": subsets, "x_unlabeled": torch.randn(16, 3, 8, 8, generator=g),
           "my_val_metric": lambda model, k: 0.5}
    (tmp_path / "run").mkdir()
    exec(compile(code, "README-collapse", "exec"), env)
    assert (tmp_path / "run" / "sweep.json").is_file()
    assert isinstance(env["mon"].warnings, list) and env["rec"].sweep.points[0].sparsity == 0
