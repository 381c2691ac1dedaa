"""Chat data: one template, record adapters, hh-rlhf splitting, SFT and preference examples.

The template, in ids (markers are control pieces, see data.tokenizer), a newline piece after
every <|end|>:  BOS <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> EOS.
The loss mask covers assistant contents, the <|end|> closing each, and the EOS after a final
assistant turn; never system or user turns or role markers. Generation prompts end '<|assistant|>'.

Record adapters (`sft_format`; 'auto' picks by the fields present) give `messages`
([{'role', 'content'}, ...]): messages {'messages': [...]}, alpaca {'instruction', 'input',
'output'}, self_instruct {'instruction', 'instances': [{'input', 'output'}, ...]} (one each),
prompt_response {'prompt', 'response'}. Preference records: {'prompt', 'chosen', 'rejected'}
strings, or hh-rlhf {'chosen', 'rejected'} whole dialogues split by `split_hh`.
"""

import os
import re
from typing import Any

import numpy as np

from data import readers
from data import tokenizer as tokenizer_lib

ROLES = ('system', 'user', 'assistant')
SFT_FORMATS = ('auto', 'messages', 'alpaca', 'self_instruct', 'prompt_response')
_HH_TURN = re.compile(r'\n\n(Human|Assistant): ')
_DETECT = (('messages', 'messages'), ('instances', 'self_instruct'), ('instruction', 'alpaca'))


class TemplateError(ValueError):
  """A chat example that would teach nothing (an all-zero loss mask)."""


class ChatTemplate:
  """Renders messages to ids and a per-token mask of what the model learns."""

  def __init__(self, tok: tokenizer_lib.Tokenizer):
    self.tok = tok
    self.role_ids = {r: tok.special_id(f'<|{r}|>') for r in ROLES}
    self.end_id = tok.special_id('<|end|>')
    self.newline = tok.encode('\n')

  def encode(self, messages: list[dict[str, str]], *,
             generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[L], weights float32[L]): weights[i] = 1 where ids[i] is learned."""
    ids, weights = [self.tok.bos_id], [0.0]
    for m in messages:
      content = self.tok.encode(m['content'])
      learn = 1.0 if m['role'] == 'assistant' else 0.0
      ids += [self.role_ids[m['role']]] + content + [self.end_id] + self.newline
      weights += [0.0] + [learn] * (len(content) + 1) + [0.0] * len(self.newline)
    if generation_prompt:
      ids.append(self.role_ids['assistant'])
      weights.append(0.0)
    else:  # The EOS that ends a conversation closing on an assistant turn is learned too.
      ids.append(self.tok.eos_id)
      weights.append(1.0 if messages and messages[-1]['role'] == 'assistant' else 0.0)
    return np.asarray(ids, np.int32), np.asarray(weights, np.float32)

  def sft_example(self, messages: list[dict[str, str]], where: str) -> tuple[np.ndarray, np.ndarray]:
    ids, weights = self.encode(messages)
    if not weights.any():
      raise TemplateError(f'{where}: the chat template gives an all-zero loss mask (no '
                          f'assistant turn to learn); roles were {[m["role"] for m in messages]}')
    return ids, weights

  def render(self, messages: list[dict[str, str]]) -> str:
    """The template as text (markers written out), for reading and debugging."""
    return ''.join(f'<|{m["role"]}|>{m["content"]}<|end|>\n' for m in messages)


def _check_messages(messages: Any, where: str, bad: readers.BadInput) -> list | None:
  if not isinstance(messages, list) or not messages:
    bad(where, 'missing_field', "'messages' must be a non-empty list")
    return None
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get('role') not in ROLES or not isinstance(
        m.get('content'), str):
      bad(where, 'missing_field', f'message {i} needs a role in {ROLES} and a string content')
      return None
    out.append({'role': m['role'], 'content': m['content']})
  if not any(m['role'] == 'assistant' and m['content'].strip() for m in out):
    bad(where, 'empty', 'no non-empty assistant message')
    return None
  return out


def _pair(user: str, assistant: str, system: str | None = None) -> list[dict[str, str]]:
  turns = [{'role': 'system', 'content': system}] if system else []
  return turns + [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': assistant}]


def sft_messages(obj: dict[str, Any], fmt: str, where: str,
                 bad: readers.BadInput) -> list[list[dict[str, str]]]:
  """The conversations in one record (self-instruct records hold several)."""
  if fmt not in SFT_FORMATS:
    raise ValueError(f'config.data sft_format {fmt!r} is not one of {SFT_FORMATS}')
  if fmt == 'auto':  # By the first of these keys present.
    fmt = next((f for key, f in _DETECT if key in obj), 'prompt_response')
  system = obj.get('system') if isinstance(obj.get('system'), str) else None
  if fmt == 'messages':
    messages = _check_messages(obj.get('messages'), where, bad)
    return [messages] if messages else []
  if fmt == 'prompt_response':
    prompt = readers.get_field(obj, 'prompt', where, bad)
    response = None if prompt is None else readers.get_field(obj, 'response', where, bad)
    if response is None:
      return []
    candidates = [_pair(prompt, response, system)]
  else:
    instruction = readers.get_field(obj, 'instruction', where, bad)
    if instruction is None:
      return []
    items = [obj] if fmt == 'alpaca' else readers.get_field(obj, 'instances', where, bad, list)
    candidates = []
    for item in items or []:
      if not isinstance(item, dict) or not isinstance(item.get('output'), str):
        bad(where, 'missing_field', "field 'output' is missing")
        continue
      extra = item.get('input') or ''
      user = f'{instruction}\n\n{extra}' if isinstance(extra, str) and extra.strip() else instruction
      candidates.append(_pair(user, item['output'], system))
  out = []
  for messages in candidates:
    if not messages[-1]['content'].strip() or not messages[-2]['content'].strip():
      bad(where, 'empty', 'empty prompt or response')
      continue
    out.append(messages)
  return out


def split_hh(chosen: str, rejected: str, where: str,
             bad: readers.BadInput) -> tuple[list, str, str] | None:
  """hh-rlhf dialogues -> (prompt messages, chosen reply, rejected reply), or None if bad; cut at
  the last '\\n\\nAssistant: ' in their common prefix (replies may contain the marker)."""
  marker = '\n\nAssistant: '
  common = os.path.commonprefix([chosen, rejected])
  cut = common.rfind(marker)
  if cut < 0:
    bad(where, 'missing_field', 'the dialogues share no "\\n\\nAssistant: " turn')
    return None
  parts = _HH_TURN.split(chosen[:cut])
  if parts[0].strip() or len(parts) < 3:
    bad(where, 'missing_field', 'the dialogue does not start with "\\n\\nHuman: "')
    return None
  roles = {'Human': 'user', 'Assistant': 'assistant'}
  prompt = [{'role': roles[parts[i]], 'content': parts[i + 1]} for i in range(1, len(parts), 2)]
  return prompt, chosen[cut + len(marker):], rejected[cut + len(marker):]


def preference_messages(obj: dict[str, Any], where: str,
                        bad: readers.BadInput) -> tuple[list, list] | None:
  """A preference record -> (chosen messages, rejected messages) sharing the prompt turns."""
  chosen = readers.get_field(obj, 'chosen', where, bad)
  rejected = None if chosen is None else readers.get_field(obj, 'rejected', where, bad)
  if rejected is None:
    return None
  if 'prompt' in obj:
    prompt = readers.get_field(obj, 'prompt', where, bad)
    split = None if prompt is None else ([{'role': 'user', 'content': prompt}], chosen, rejected)
  else:
    split = split_hh(chosen, rejected, where, bad)
  if split is None:
    return None
  turns, reply_c, reply_r = split
  if not reply_c.strip() or not reply_r.strip() or not turns[-1]['content'].strip():
    bad(where, 'empty', 'empty prompt or reply')
    return None
  return (turns + [{'role': 'assistant', 'content': reply_c}],
          turns + [{'role': 'assistant', 'content': reply_r}])
