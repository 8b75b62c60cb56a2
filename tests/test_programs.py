"""End-to-end programs as users write them, each run once with nn.RNN and once with rnn_ext.RNN from
one seed: a word-level language model (tied weights, dropout, truncated BPTT, clipping, a whole-model
checkpoint), a classifier on packed padded batches, streaming inference, and DataLoader workers
forked from a parent that already ran the module. float64 losses agree to 1e-9 relative at every
step; the random streams (dropout masks) stay in step."""

import math
import multiprocessing

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext

IMPLEMENTATIONS = {"torch": nn.RNN, "rnn_ext": rnn_ext.RNN}
FLOAT64_RTOL = 1e-9
# float32 runs: a few optimiser steps of models whose sums differ in order between the two.
FLOAT32_RTOL = 1e-4


def assert_losses_agree(ours, reference, rtol):
    assert len(ours) == len(reference) and len(ours) > 0
    for step, (a, b) in enumerate(zip(ours, reference)):
        assert math.isfinite(a) and math.isfinite(b)
        assert abs(a - b) <= rtol * abs(b), f"step {step}: rnn_ext {a!r} vs nn.RNN {b!r}"


# --- A word-level language model (PyTorch's word_language_model example, Elman variant) ---------


class WordLM(nn.Module):
    def __init__(self, rnn_class, ntoken, ninp, nhid, nlayers, dropout, nonlinearity):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = rnn_class(ninp, nhid, nlayers, nonlinearity=nonlinearity, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.decoder.weight = self.encoder.weight  # tied weights: ninp == nhid
        self.nlayers = nlayers
        self.nhid = nhid

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, batch, dtype):
        return torch.zeros(self.nlayers, batch, self.nhid, dtype=dtype)


def make_corpus(ntoken, length, seed):
    """A token stream from a random Markov chain, so that there is something to learn."""
    generator = torch.Generator().manual_seed(seed)
    transitions = torch.softmax(3 * torch.randn(ntoken, ntoken, generator=generator), dim=1)
    tokens = [0]
    for _ in range(length - 1):
        tokens.append(int(torch.multinomial(transitions[tokens[-1]], 1, generator=generator)))
    return torch.tensor(tokens)


def batchify(data, batch):
    steps = data.size(0) // batch
    return data[: steps * batch].view(batch, -1).t().contiguous()


def train_language_model(rnn_class, dtype, tmp_path, epochs, nonlinearity="tanh"):
    """The example's train() and evaluate(), with a whole-model checkpoint saved after each epoch
    and the best one reloaded (weights_only, with an nn.RNN user's allow-list) for the test run.
    Returns the training losses per step, the evaluation losses and the test loss."""
    ntoken, nhid, bptt, batch, clip, lr = 40, 16, 7, 6, 0.25, 2.0
    corpus = make_corpus(ntoken, 900, seed=11)
    train_data = batchify(corpus[:600], batch)
    valid_data = batchify(corpus[600:750], 5)
    test_data = batchify(corpus[750:], 5)
    torch.manual_seed(1234)
    model = WordLM(rnn_class, ntoken, nhid, nhid, 2, 0.3, nonlinearity).to(dtype)
    criterion = nn.NLLLoss()
    path = tmp_path / f"{rnn_class.__module__}.pt"

    def get_batch(source, i):
        length = min(bptt, len(source) - 1 - i)
        return source[i : i + length], source[i + 1 : i + 1 + length].reshape(-1)

    def evaluate(model, source):
        model.eval()
        total = 0.0
        hidden = model.init_hidden(source.size(1), dtype)
        with torch.no_grad():
            for i in range(0, source.size(0) - 1, bptt):
                data, targets = get_batch(source, i)
                output, hidden = model(data, hidden)
                total += len(data) * criterion(output, targets).item()
        return total / (len(source) - 1)

    train_losses, valid_losses, best = [], [], None
    for _ in range(epochs):
        model.train()
        hidden = model.init_hidden(batch, dtype)
        for i in range(0, train_data.size(0) - 1, bptt):
            data, targets = get_batch(train_data, i)
            hidden = hidden.detach()  # truncated BPTT
            model.zero_grad()
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-lr)
            train_losses.append(loss.item())
        valid_losses.append(evaluate(model, valid_data))
        if best is None or valid_losses[-1] < best:
            best = valid_losses[-1]
            torch.save(model, path)
    allowed = [WordLM, torch.nn.modules.rnn.RNN, nn.Dropout, nn.Embedding, nn.Linear]
    with torch.serialization.safe_globals(allowed):
        reloaded = torch.load(path, weights_only=True)
    assert type(reloaded.rnn) is rnn_class
    test_loss = evaluate(reloaded, test_data)
    return train_losses, valid_losses, test_loss, torch.get_rng_state()


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_word_language_model_float64(tmp_path, nonlinearity):
    results = {
        name: train_language_model(cls, torch.float64, tmp_path, epochs=2, nonlinearity=nonlinearity)
        for name, cls in IMPLEMENTATIONS.items()
    }
    ours, reference = results["rnn_ext"], results["torch"]
    assert_losses_agree(ours[0], reference[0], FLOAT64_RTOL)
    assert_losses_agree(ours[1], reference[1], FLOAT64_RTOL)
    assert_losses_agree([ours[2]], [reference[2]], FLOAT64_RTOL)
    # The same random numbers were drawn, in the same order: the dropout masks were the same.
    assert torch.equal(ours[3], reference[3])
    assert ours[0][-1] < ours[0][0]  # it learned something


def test_word_language_model_float32(tmp_path):
    results = {
        name: train_language_model(cls, torch.float32, tmp_path, epochs=1)
        for name, cls in IMPLEMENTATIONS.items()
    }
    ours, reference = results["rnn_ext"], results["torch"]
    assert_losses_agree(ours[0], reference[0], FLOAT32_RTOL)
    assert_losses_agree(ours[1] + [ours[2]], reference[1] + [reference[2]], FLOAT32_RTOL)


# --- A sequence classifier on padded batches of different lengths ------------------------------


class Classifier(nn.Module):
    def __init__(self, rnn_class, features, hidden, classes):
        super().__init__()
        self.rnn = rnn_class(
            features, hidden, num_layers=2, batch_first=True, bidirectional=True, dropout=0.2
        )
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, padded, lengths):
        packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
        _, h_n = self.rnn(packed)
        return self.head(torch.cat([h_n[-2], h_n[-1]], dim=1))


def train_classifier(rnn_class, dtype, steps):
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(steps):
        lengths = torch.randint(1, 12, (9,), generator=generator)
        padded = torch.randn(9, int(lengths.max()), 4, generator=generator, dtype=dtype)
        for row, length in enumerate(lengths.tolist()):
            padded[row, length:] = 0
        labels = (padded.sum(dim=(1, 2)) > 0).long()
        batches.append((padded, lengths, labels))
    torch.manual_seed(77)
    model = Classifier(rnn_class, 4, 10, 2).to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for padded, lengths, labels in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(padded, lengths), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        padded, lengths, labels = batches[0]
        losses.append(F.cross_entropy(model(padded, lengths), labels).item())
    return losses, torch.get_rng_state()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_classifier(dtype):
    ours, ours_rng = train_classifier(rnn_ext.RNN, dtype, steps=12)
    reference, reference_rng = train_classifier(nn.RNN, dtype, steps=12)
    assert_losses_agree(ours, reference, FLOAT64_RTOL if dtype == torch.float64 else FLOAT32_RTOL)
    assert torch.equal(ours_rng, reference_rng)


# --- Streaming inference: one call per time step, the state carried -----------------------------


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("unbatched", [False, True])
def test_streaming_matches_whole_sequence(batch_first, unbatched):
    torch.manual_seed(3)
    reference = nn.RNN(5, 8, num_layers=2, batch_first=batch_first, dtype=torch.float64).eval()
    ours = rnn_ext.convert(reference)
    steps, batch = 15, 3
    x = torch.randn(steps, 5, dtype=torch.float64) if unbatched else torch.randn(steps, batch, 5).double()
    time_dim = 0 if unbatched or not batch_first else 1
    if batch_first and not unbatched:
        x = x.transpose(0, 1).contiguous()
    with torch.no_grad():
        whole, whole_h = reference(x)
        streamed, hidden = [], None
        for t in range(steps):
            out, hidden = ours(x.narrow(time_dim, t, 1), hidden)
            streamed.append(out)
    torch.testing.assert_close(torch.cat(streamed, time_dim), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden, whole_h, rtol=1e-12, atol=1e-12)


# --- DataLoader workers forked from a parent that already ran the module ------------------------


class RunsTheModule(torch.utils.data.Dataset):
    """Each item runs the RNN (inherited by the forked worker) on its own input."""

    def __init__(self, module, inputs):
        self.module = module
        self.inputs = inputs

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        with torch.no_grad():
            output, h_n = self.module(self.inputs[index])
        return output, h_n


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_dataloader_fork_workers():
    """Workers keep DataLoader's one thread each. (A worker that raises its thread count after the
    fork hangs in GNU OpenMP, with nn.RNN as with rnn_ext: torch's CPU wheel uses libgomp, which
    cannot start a new thread team in a child forked after the parent used one.)"""
    torch.manual_seed(8)
    reference = nn.RNN(32, 64, num_layers=2, dtype=torch.float64)
    ours = rnn_ext.convert(reference)
    inputs = [torch.randn(20, 16, 32, dtype=torch.float64) for _ in range(6)]
    with torch.no_grad():
        expected = [reference(x) for x in inputs]
        ours(inputs[0])  # the parent's OpenMP team exists before the fork
    loader = torch.utils.data.DataLoader(
        RunsTheModule(ours, inputs),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        timeout=120,  # a hung worker fails the test instead of blocking it
    )
    results = list(loader)
    assert len(results) == len(inputs)
    for (output, h_n), (expected_output, expected_h_n) in zip(results, expected):
        torch.testing.assert_close(output, expected_output, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h_n, expected_h_n, rtol=1e-10, atol=1e-12)
