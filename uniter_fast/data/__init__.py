"""Data pipeline: UNITER's LMDB formats, the synthetic grounded dataset,
conditional-masking datasets, UNITER's batch dicts, token-bucket sampling and
task mixing."""
from .build import create_train_loader, create_val_loaders, resolve_path, task_of, text_meta
from .collate import (
    collate_fn_for,
    get_gather_index,
    itm_collate,
    itm_ot_collate,
    mlm_collate,
    mrc_collate,
    mrfr_collate,
    pad_tensors,
)
from .datasets import (
    DetectFeatTxtTokDataset,
    ItmDataset,
    MlmDataset,
    MrcDataset,
    MrfrDataset,
    build_dataset,
)
from .db import DbError, DetectFeatLmdb, TxtTokLmdb, compute_num_bb, write_img_db, write_txt_db
from .itm import (
    ItmEvalDataset,
    ItmRankDataset,
    ItmRankDatasetHardNegFromImage,
    ItmRankDatasetHardNegFromText,
    ItmValDataset,
    itm_eval_collate,
    itm_rank_collate,
    itm_rank_hn_collate,
    itm_val_collate,
)
from .loader import ConcatDatasetWithLens, MetaLoader, TaskLoader, move_to_device
from .nlvr2 import (
    Nlvr2PairedDataset,
    Nlvr2PairedEvalDataset,
    Nlvr2TripletDataset,
    Nlvr2TripletEvalDataset,
    nlvr2_paired_collate,
    nlvr2_paired_eval_collate,
    nlvr2_triplet_collate,
    nlvr2_triplet_eval_collate,
)
from .re import ReDataset, ReEvalDataset, ReTxtTokLmdb, re_collate, re_eval_collate, write_re_txt_db
from .sampler import TokenBucketSampler
from .synthetic import SyntheticSpec, ensure_synthetic, generate_synthetic
from .vcr import (
    VcrDataset,
    VcrEvalDataset,
    VcrTxtTokLmdb,
    vcr_collate,
    vcr_eval_collate,
    write_vcr_txt_db,
)
from .ve import VE_ENT2IDX, VE_IDX2ENT, VeDataset, VeEvalDataset, ve_collate, ve_eval_collate
from .vqa import (
    ANS2LABEL_PATH,
    VqaDataset,
    VqaEvalDataset,
    load_ans2label,
    vqa_collate,
    vqa_eval_collate,
)

__all__ = [
    "create_train_loader", "create_val_loaders", "resolve_path", "task_of", "text_meta",
    "collate_fn_for", "get_gather_index", "itm_collate", "itm_ot_collate", "mlm_collate",
    "mrc_collate", "mrfr_collate", "pad_tensors", "DetectFeatTxtTokDataset", "ItmDataset",
    "MlmDataset", "MrcDataset", "MrfrDataset", "build_dataset", "DbError", "DetectFeatLmdb",
    "TxtTokLmdb", "compute_num_bb", "write_img_db", "write_txt_db", "ConcatDatasetWithLens",
    "MetaLoader", "TaskLoader", "move_to_device", "TokenBucketSampler", "SyntheticSpec",
    "ensure_synthetic", "generate_synthetic",
    "VqaDataset", "VqaEvalDataset", "vqa_collate", "vqa_eval_collate", "load_ans2label",
    "ANS2LABEL_PATH", "VeDataset", "VeEvalDataset", "ve_collate", "ve_eval_collate",
    "VE_ENT2IDX", "VE_IDX2ENT", "Nlvr2PairedDataset", "Nlvr2PairedEvalDataset",
    "Nlvr2TripletDataset", "Nlvr2TripletEvalDataset", "nlvr2_paired_collate",
    "nlvr2_paired_eval_collate", "nlvr2_triplet_collate", "nlvr2_triplet_eval_collate",
    "ItmRankDataset", "ItmRankDatasetHardNegFromText", "ItmRankDatasetHardNegFromImage",
    "ItmValDataset", "ItmEvalDataset", "itm_rank_collate", "itm_rank_hn_collate",
    "itm_val_collate", "itm_eval_collate", "ReTxtTokLmdb", "ReDataset", "ReEvalDataset",
    "re_collate", "re_eval_collate", "write_re_txt_db", "VcrTxtTokLmdb", "VcrDataset",
    "VcrEvalDataset", "vcr_collate", "vcr_eval_collate", "write_vcr_txt_db",
]
