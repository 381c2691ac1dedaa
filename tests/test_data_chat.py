"""Chat template masks, record adapters, SFT packing, preference pairs, hh-rlhf splitting."""

import json

import numpy as np
import pytest

from data import chat, corpus, pipeline, readers
from data import config as data_config
from data import tokenizer as tokenizer_lib

VOCAB = 512


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  docs = corpus.documents(seed=0, num_docs=600)
  return tokenizer_lib.train(docs, VOCAB, 'unigram', tmp_path_factory.mktemp('tok') / 'tok')


def _learned(tok, ids, weights):
  """The text of the tokens the mask selects, split where the mask has gaps."""
  runs, current = [], []
  for i, w in zip(ids, weights):
    if w:
      current.append(int(i))
    elif current:
      runs.append(current)
      current = []
  if current:
    runs.append(current)
  return runs


def test_mask_covers_assistant_and_end_only(tok):
  template = chat.ChatTemplate(tok)
  messages = [{'role': 'system', 'content': 'Be brief.'},
              {'role': 'user', 'content': 'What is 2 + 2?'},
              {'role': 'assistant', 'content': 'It is 4.'},
              {'role': 'user', 'content': 'And 3 + 3?'},
              {'role': 'assistant', 'content': '6'}]
  ids, weights = template.encode(messages)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and weights[-1] == 1  # The final EOS.
  runs = _learned(tok, ids, weights)
  assert [tok.decode(r) for r in runs[:2]] == ['It is 4.', '6']
  assert [r[-1] for r in runs[:2]] == [template.end_id] * 2
  assert runs[2:] == [[tok.eos_id]]
  user_last, _ = template.encode(messages[:2])
  assert user_last[-1] == tok.eos_id and template.encode(messages[:2])[1][-1] == 0
  # Nothing of the system or user turns, nor any role marker, is learned.
  assert not np.any(weights[np.isin(ids, list(template.role_ids.values()))])
  prompt, _ = template.encode(messages[:2], generation_prompt=True)
  assert prompt[-1] == template.role_ids['assistant'] and np.array_equal(prompt, ids[:len(prompt)])
  assert template.render(messages[1:3]) == ('<|user|>What is 2 + 2?<|end|>\n'
                                            '<|assistant|>It is 4.<|end|>\n')


def test_all_zero_mask_is_a_loud_error(tok):
  template = chat.ChatTemplate(tok)
  with pytest.raises(chat.TemplateError, match='f.jsonl:7: .*all-zero loss mask'):
    template.sft_example([{'role': 'user', 'content': 'hello'}], 'f.jsonl:7')


def test_adapters(shared_data):
  bad = readers.BadInput('raise')
  alpaca = chat.sft_messages({'instruction': 'Add.', 'input': '2 3', 'output': '5'}, 'auto', 'x', bad)
  assert alpaca == [[{'role': 'user', 'content': 'Add.\n\n2 3'}, {'role': 'assistant', 'content': '5'}]]
  no_input = chat.sft_messages({'instruction': 'Hi.', 'input': '', 'output': 'Hello'}, 'alpaca', 'x', bad)
  assert no_input[0][0]['content'] == 'Hi.'
  pr = chat.sft_messages({'prompt': 'p', 'response': 'r', 'system': 's'}, 'auto', 'x', bad)
  assert [m['role'] for m in pr[0]] == ['system', 'user', 'assistant']
  msgs = [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}]
  assert chat.sft_messages({'messages': msgs}, 'auto', 'x', bad) == [msgs]
  n = 0
  for where, obj in readers.iter_jsonl(str(shared_data / 'self_instruct_seed_tasks.jsonl'), bad):
    found = chat.sft_messages(obj, 'self_instruct', where, bad)
    assert len(found) == len(obj['instances'])
    assert found[0][1]['content'] == obj['instances'][0]['output']
    assert found[0][0]['content'].startswith(obj['instruction'])
    n += len(found)
  assert n >= 175


def test_adapter_bad_records_raise_or_count():
  skip = readers.BadInput('skip')
  records = [{'messages': []}, {'messages': [{'role': 'user', 'content': 'only'}]},
             {'messages': [{'role': 'robot', 'content': 'x'}]}, {'instruction': 'x'},
             {'prompt': 'p'}, {'prompt': 'p', 'response': ' '}]
  for r in records:
    assert chat.sft_messages(r, 'auto', 'f:1', skip) == []
  assert skip.counts == {'missing_field': 4, 'empty': 2}
  with pytest.raises(readers.BadInputError, match="f:3: field 'response' is missing"):
    chat.sft_messages({'prompt': 'p'}, 'auto', 'f:3', readers.BadInput('raise'))


def _cfg(workdir, path, fmt, **kw):
  cfg = data_config.default_config()
  cfg.seq_len = 96
  cfg.tokenizer_docs = 400
  cfg.embedded_docs = 500
  cfg.packing = 'pad'
  cfg.sources.data = data_config.source_entry('jsonl', fmt, path=str(path), eval_fraction=0.0)
  cfg.source = 'data'
  cfg.update(kw)
  return cfg


def test_sft_pipeline_masks_align_after_packing(tmp_path, tok):
  path = tmp_path / 'sft.jsonl'
  rows = [{'instruction': f'Say the number {i}.', 'input': '', 'output': f'{i}'} for i in range(50)]
  rows.append({'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]})
  rows.append({'instruction': 'Long ' * 200, 'output': 'x'})  # over-long
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n', encoding='utf-8')
  cfg = _cfg(str(tmp_path), path, 'sft', tokenizer=tok.path, on_bad_input='skip')
  it = pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=4, workdir=str(tmp_path))
  assert it.build_stats['data']['too_long'] == 1
  end = tok.special_id('<|end|>')
  for _ in range(5):
    b = next(it)
    for r in range(4):
      for s in np.unique(b['segment_ids'][r][b['segment_ids'][r] > 0]):
        seg = b['segment_ids'][r] == s
        targets, mask = b['targets'][r][seg], b['loss_mask'][r][seg]
        learned = targets[mask == 1]
        # Every segment is one whole example: it learns its answer, <|end|>, then the final EOS.
        assert list(learned[-2:]) == [end, tok.eos_id] and mask.sum() >= 3
        answer = tok.decode(learned[:-2])
        prompt = tok.decode(b['inputs'][r][seg])
        assert answer in ('Hello!',) or f'Say the number {answer}.' in prompt
  cfg.on_bad_input = 'raise'
  with pytest.raises(readers.BadInputError, match=r'sft.jsonl:52: example of \d+ tokens'):
    pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=4, workdir=str(tmp_path))


def test_embedded_sft_and_preference(tmp_path):
  cfg = data_config.default_config()
  cfg.update(seq_len=96, tokenizer_docs=300, embedded_docs=300, embedded_examples=200,
             embedded_eval_docs=20, packing='pad', source='embedded_sft')
  it = pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=2, workdir=str(tmp_path))
  b = next(it)
  assert 0 < b['loss_mask'].sum() < b['segment_ids'].astype(bool).sum()
  cfg.source = 'embedded_preference'
  pit = pipeline.make_preference_iterator(cfg, vocab_size=VOCAB, global_batch=2,
                                          workdir=str(tmp_path))
  pair = next(pit)
  tok = pit.tokenizer
  for r in range(2):
    chosen = tok.decode(pair['chosen']['targets'][r][pair['chosen']['loss_mask'][r] == 1])
    rejected = tok.decode(pair['rejected']['targets'][r][pair['rejected']['loss_mask'][r] == 1])
    assert chosen.startswith('The answer is') and rejected.startswith('The answer is')
    assert chosen != rejected
    prompt_len = int(np.argmax(pair['chosen']['loss_mask'][r]))
    assert np.array_equal(pair['chosen']['inputs'][r][:prompt_len],
                          pair['rejected']['inputs'][r][:prompt_len])


def test_hh_rlhf_split_and_preference_batches(tmp_path, tok, shared_data):
  path = shared_data / 'hh_rlhf_harmless_base_test.jsonl.gz'
  bad = readers.BadInput('skip', log=False)
  pairs = 0
  for where, obj in readers.iter_jsonl(str(path), bad):
    split = chat.preference_messages(obj, where, bad)
    if split is None:
      continue
    chosen, rejected = split
    pairs += 1
    assert chosen[:-1] == rejected[:-1] and chosen[-1]['role'] == 'assistant'
    assert chosen[0]['role'] == 'user'
    rebuilt = ''.join(f'\n\n{"Human" if m["role"] == "user" else "Assistant"}: {m["content"]}'
                      for m in chosen)
    assert rebuilt == obj['chosen']
  assert pairs == 2308 and bad.counts == {'empty': 4}
  cfg = _cfg(str(tmp_path), path, 'preference', tokenizer=tok.path, on_bad_input='skip',
             seq_len=512)
  it = pipeline.make_preference_iterator(cfg, vocab_size=VOCAB, global_batch=2,
                                         workdir=str(tmp_path))
  built = it.build_stats['data']
  assert built['records'] == 2312 and built['bad_input'] == {'empty': 4}
  assert built['items'] + built['too_long'] == 2308
  batch = next(it)
  for side in ('chosen', 'rejected'):
    rows = batch[side]
    assert rows['inputs'].shape == (2, 512)
    assert np.all(rows['loss_mask'].sum(1) > 0)
    assert np.all((rows['segment_ids'] <= 1))  # one sequence per row
  cfg.on_bad_input = 'raise'
  with pytest.raises(readers.BadInputError, match='hh_rlhf_harmless_base_test.jsonl.gz:\\d+'):
    pipeline.make_preference_iterator(cfg, vocab_size=VOCAB, global_batch=2,
                                      workdir=str(tmp_path))


def test_preference_shards_make_the_global_batch(tmp_path):
  cfg = data_config.default_config()
  cfg.update(seq_len=96, tokenizer_docs=300, embedded_docs=300, embedded_examples=100,
             embedded_eval_docs=20, source='embedded_preference')
  make = lambda **kw: pipeline.make_preference_iterator(cfg, vocab_size=VOCAB, global_batch=4,
                                                        workdir=str(tmp_path), **kw)
  whole = make()
  shards = [make(process_index=p, process_count=2) for p in range(2)]
  state = whole.get_state()
  for _ in range(2):
    batch, parts = next(whole), [next(s) for s in shards]
    for side in ('chosen', 'rejected'):
      for k, v in batch[side].items():
        assert np.array_equal(v, np.concatenate([p[side][k] for p in parts]))
  again = make()
  again.set_state(state)
  assert np.array_equal(next(again)['chosen']['inputs'], next(make())['chosen']['inputs'])
