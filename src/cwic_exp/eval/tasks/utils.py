"""`!function` hooks of the offline task YAMLs beside this file (lm-eval loads it by path)."""
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice, doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text)

from cwic_exp.eval.data import load_dataset  # noqa: F401
