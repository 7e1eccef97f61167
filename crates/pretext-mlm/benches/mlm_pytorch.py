# transformers' BertForMaskedLM training throughput in fp32 and under bf16
# autocast, on CPU: the reference's BERT-mini (4 x 256, 4 heads, FFN 1024,
# WordPiece 8000 trained on the corpus, batch 32 x 128, AdamW 1e-3, weight
# decay 0.01), the reference's own corpus, packing and masking (imported from
# its reference.py), timed as `reference.py mlm` times a step (masking,
# forward, backward, optimizer step). The two precisions alternate in rounds
# of STEPS steps each, so drift hits both alike. Prints, per precision, the
# median step's tokens/s:
#   mlm_pytorch.py REFERENCE_DIR [STEPS] [ROUNDS]
# e.g. ".venv/bin/python mlm_pytorch.py /path/to/reference 10 1" printed, on
# the AMD EPYC of 2026-12-05 (2 threads),
#   fp32 2817.2 tokens/s
#   bf16 4230.4 tokens/s
import os
import statistics
import sys
import tempfile
import time

ref_dir = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
sys.path.insert(0, ref_dir)
import reference as R  # noqa: E402 (pins the thread pools to 2 before torch loads)
import torch  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

R.seed_all(0)
_, _, _, _, corpus = R.fortune_data(seed=0)
with tempfile.TemporaryDirectory() as tmp:
    tok = R.train_wordpiece(corpus, 8000, os.path.join(tmp, "wordpiece.json"))
specials = {s: tok.token_to_id(s) for s in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}
V = tok.get_vocab_size()
SEQ, B = 128, 32
train_ids, _ = R.pack_chunks(tok, corpus, SEQ)
cfg = BertConfig(vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024, max_position_embeddings=SEQ, pad_token_id=specials["[PAD]"])
torch.manual_seed(0)
model = BertForMaskedLM(cfg)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
gmask = torch.Generator().manual_seed(0)
perm = torch.randperm(len(train_ids))
pos = 0


def step(bf16):
    global pos
    if pos + B > len(perm):
        pos = 0
    ids = train_ids[perm[pos:pos + B]]
    pos += B
    inp, lab = R.mask_tokens(ids, V, specials, gmask)
    if bf16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=inp, labels=lab).loss
    else:
        loss = model(input_ids=inp, labels=lab).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


times = {False: [], True: []}
for _ in range(rounds):
    for bf16 in (False, True):
        for i in range(steps + 3):
            t0 = time.perf_counter()
            step(bf16)
            if i >= 3:  # the first steps of each round warm the allocator and kernels
                times[bf16].append(time.perf_counter() - t0)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, attention {cfg._attn_implementation}")
for bf16, name in ((False, "fp32"), (True, "bf16")):
    med = statistics.median(times[bf16])
    print(f"{name} {B * SEQ / med:.1f} tokens/s")
