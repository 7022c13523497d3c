"""Numbers that UNITER fixes, each named once.

Everything that needs one of these imports it from here (model, ops,
reference twins, kernels), so a value cannot drift between two copies.
"""
import signal

#: additive attention score of a padded key: ``(1 - attn_mask) * ATTENTION_MASK_VALUE``
#: (UNITER/BERT; a finite value, so a query whose keys are all padding averages them all)
ATTENTION_MASK_VALUE = -10000.0

#: epsilon of every LayerNorm in UNITER (BERT's ``BertLayerNorm``)
LAYER_NORM_EPS = 1e-12

#: width of a region's box feature ``img_pos_feat``: [x1, y1, x2, y2, w, h, w·h]
BOX_FEATURE_DIM = 7

#: WRA / IPOT defaults of UNITER's ``optimal_transport_dist``
IPOT_BETA = 0.5
IPOT_ITERATIONS = 50
IPOT_INNER_ITERATIONS = 1

#: the IPOT ops hand the float32 kernels only a cost spanning at most this · beta, in at
#: most IPOT_FAST_MAX_ITERATIONS iterations (UNITER's 1 - cos at beta = 0.5 spans 4); beyond
#: it float32 IPOT can lose plan entries (seen from 8 · beta at 50 iterations, and from
#: 5 · beta at 150), and the ops compute the plan in the log domain in float64 instead
IPOT_FAST_MAX_COST_OVER_BETA = 6.0
IPOT_FAST_MAX_ITERATIONS = 100

#: the WRA distance's cost 1 - cos spans up to 2: from this beta on it always fits the
#: float32 kernels (below it, the cost is computed first and routed like any other)
WRA_FAST_MIN_BETA = 2.0 / IPOT_FAST_MAX_COST_OVER_BETA

#: the reference IPOT adds this to the denominators of padded rows/columns
#: (UNITER's ``x_mask``/``y_mask``) so that their sigma/delta are ~0
IPOT_PAD_PENALTY = 1e4

#: ``F.normalize`` epsilon of UNITER's ``cost_matrix_cosine``
COSINE_EPS = 1e-5

#: widest attention head the fused Triton kernel takes (padded to a power of two ≥ 16 inside)
TRITON_ATTENTION_MAX_HEAD_DIM = 128

#: the signals that stop a training run with a checkpoint (uniter_fast.training.signals);
#: DataLoader worker processes ignore them (the main process saves and ends them)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: width of UNITER's region features (the bottom-up-attention detector's pooled res5 output)
IMG_DIM = 2048
#: classes of that detector's soft labels (1600 Visual Genome classes + background)
IMG_LABEL_DIM = 1601

#: UNITER's ``utils/const.py`` BUCKET_SIZE: examples sorted by length together in the
#: token-bucket sampler
BUCKET_SIZE = 8192

#: the training config's ``seed`` when it has none (UNITER's argparse default)
DEFAULT_SEED = 42
#: a training sampler's seed is ``seed + RANK_SEED_STRIDE * rank`` (disjoint orders per rank)
RANK_SEED_STRIDE = 7919

#: UNITER's box rule defaults (``conf_th``, ``max_bb``, ``min_bb``, ``num_bb``): regions of
#: confidence >= conf_th, at least min_bb and at most max_bb of them (num_bb: a fixed count)
DEFAULT_CONF_TH = 0.2
DEFAULT_MAX_BB = 100
DEFAULT_MIN_BB = 10
DEFAULT_NUM_BB = 36
