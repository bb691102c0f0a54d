import pytest
import torch

from cmce.checkpoint import CheckpointError, EmbeddingModel, load_embedding_model, save_embedding_model
from cmce.models import CosineClassifier, EmbeddingNet, arch_names, check_arch, count_flops


@pytest.mark.parametrize("arch", ["query_cnn", "resnet", "vgg", "mobilenet"])
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 28)])
def test_every_arch_embeds_to_the_configured_dim(arch, channels, size):
    net = EmbeddingNet(arch, channels, 24, 8).eval()
    assert net(torch.randn(3, channels, size, size)).shape == (3, 24)


def test_registry_lists_valid_names():
    assert {"query_cnn", "resnet", "vgg", "mobilenet"} <= set(arch_names())
    with pytest.raises(KeyError, match="valid names"):
        check_arch("nope")


def test_cosine_classifier_is_scale_invariant():
    head = CosineClassifier(4, 3, 10.0)
    e = torch.randn(2, 4)
    torch.testing.assert_close(head(e), head(5 * e))
    assert head(e).abs().max() <= 10.0 + 1e-5


def test_checkpoint_round_trip_weights_only(tmp_path):
    net = EmbeddingNet("vgg", 1, 16, 4).eval()
    m = EmbeddingModel("g", "vgg", net, torch.randn(3, 16), 16.0, 1, 8, 16)
    path = tmp_path / "m.pt"
    save_embedding_model(m, path, width=4)
    loaded = load_embedding_model(path)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded.net(x), net(x))
    assert len(loaded.sha256) == 64
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt: not a loadable checkpoint"):
        load_embedding_model(tmp_path / "bad.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="expected a cmce-embedding-model/1"):
        load_embedding_model(tmp_path / "other.pt")


def test_a_model_replaced_while_it_loads_has_the_version_of_the_weights_loaded(tmp_path, monkeypatch):
    """The checkpoint was read twice (torch.load, then its sha256): a model replaced in between by an atomic rename
    gave model B's weights model A's version, and `search` answered with B against A's index (3 runs in 25, exit 0).
    Here the file is replaced as torch reads it: the version is still that of the bytes loaded."""
    import os

    import cmce.checkpoint as checkpoint
    from cmce.storage import file_sha256

    path, other = tmp_path / "q.pt", tmp_path / "other.pt"
    for seed, target in ((0, path), (1, other)):
        torch.manual_seed(seed)
        save_embedding_model(EmbeddingModel("q", "vgg", EmbeddingNet("vgg", 1, 16, 4).eval(), torch.randn(3, 16), 16.0,
                                            1, 8, 16), target, width=4)
    first, second = file_sha256(path), file_sha256(other)
    model_a = load_embedding_model(path)
    real_load = torch.load

    def load_while_replaced(*args, **kwargs):
        os.replace(other, path)  # another writer renames a new model in as this one reads
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", load_while_replaced)
    loaded = load_embedding_model(path)
    monkeypatch.undo()
    assert file_sha256(path) == second and loaded.sha256 == first  # the weights are A's, and so is the version
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded.net(x), model_a.net(x), rtol=0, atol=0)


def test_identical_weights_saved_twice_have_the_same_version(tmp_path):
    import torch

    from cmce.checkpoint import save_checkpoint

    obj = {"format": "x", "weights": torch.arange(6.0)}
    assert save_checkpoint(obj, tmp_path / "a.pt") == save_checkpoint(obj, tmp_path / "b" / "c.pt")


def test_count_flops_counts_a_multiply_add_as_two_for_images_and_embeddings():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    assert count_flops(conv, 3, 10, 10) == 2 * (3 * 3 * 3) * 8 * 10 * 10  # per output: 27 multiply-adds
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))
    mlp.train()
    assert count_flops(mlp, 16) == 2 * (16 * 32 + 32 * 4)  # BatchNorm in eval mode: one input is fine
    assert mlp.training  # the mode is given back


@pytest.mark.parametrize("arch", ["query_cnn", "resnet", "vgg", "mobilenet", "efficientnet_lite0_scratch"])
def test_parameters_counted_without_building_match_the_built_network(arch):
    from cmce.models import count_parameters, embedding_net_parameters

    built = EmbeddingNet(arch, 3, 24, 8, load_pretrained=False)
    assert embedding_net_parameters(arch, 3, 24, 8) == count_parameters(built) > 0


@pytest.mark.parametrize("in_dim,out_dim,hidden,depth", [(48, 32, 64, 2), (48, 32, 7, 1), (5, 6, 7, 5)])
def test_mlp_parameters_match_the_built_mlp(in_dim, out_dim, hidden, depth):
    from cmce.models import count_parameters, mlp_parameters
    from cmce.transform import build_mlp

    assert mlp_parameters(in_dim, out_dim, hidden, depth) == count_parameters(build_mlp(in_dim, out_dim, hidden, depth))


def test_an_architecture_name_of_another_type_is_unknown_not_a_crash():
    with pytest.raises(KeyError, match="unknown architecture"):
        check_arch(["resnet"])
