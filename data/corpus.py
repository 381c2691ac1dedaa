"""The embedded default corpus: text made by deterministic generators, no files, no network.

Document `i` is a pure function of `(seed, i)` (its own `random.Random`, seeded from a string, the
same on every machine). Kinds, mixed by fixed weights: short stories, arithmetic, times tables,
counting, lists, dialogues and facts about a small world (small word lists: a tiny model learns it
fast). `instructions` and `preferences`: SFT and preference pairs with a checkable answer.
"""

import random

PRONOUN = {'Alice': 'she', 'Bob': 'he', 'Carla': 'she', 'David': 'he', 'Elena': 'she',
           'Farid': 'he', 'Grace': 'she', 'Hiro': 'he', 'Ines': 'she', 'Jonas': 'he',
           'Kemi': 'she', 'Leo': 'he', 'Maya': 'she', 'Nikos': 'he', 'Olga': 'she',
           'Pablo': 'he', 'Quinn': 'they', 'Rosa': 'she', 'Sam': 'they', 'Tariq': 'he',
           'Uma': 'she', 'Victor': 'he', 'Wen': 'they', 'Yara': 'she', 'Zoe': 'she'}
NAMES = tuple(PRONOUN)
POSSESSIVE = {'she': 'her', 'he': 'his', 'they': 'their'}
ANIMALS = ('cat', 'dog', 'owl', 'fox', 'horse', 'rabbit', 'elephant', 'turtle', 'eagle',
           'otter', 'goat', 'ant', 'bear', 'duck', 'whale', 'iguana')
PLACES = ('the park', 'the market', 'the river', 'the old library', 'the forest', 'the beach',
          'the village', 'the school', 'the bakery', 'the hill', 'the harbour', 'the garden')
OBJECTS = ('apple', 'book', 'kite', 'umbrella', 'lantern', 'map', 'egg', 'orange', 'drum',
           'key', 'hat', 'basket', 'ice cream', 'boat', 'letter', 'onion')
ADJECTIVES = ('small', 'big', 'red', 'blue', 'old', 'shiny', 'quiet', 'happy', 'green',
              'heavy', 'bright', 'soft', 'strange', 'yellow', 'ancient', 'empty')
FEELINGS = ('happy', 'tired', 'surprised', 'proud', 'worried', 'calm', 'excited', 'sad')
# (present 3rd person, past, base) for verbs taking a direct object.
VERBS = (('finds', 'found', 'find'), ('carries', 'carried', 'carry'), ('paints', 'painted', 'paint'),
         ('buys', 'bought', 'buy'), ('loses', 'lost', 'lose'), ('opens', 'opened', 'open'),
         ('draws', 'drew', 'draw'), ('hides', 'hid', 'hide'), ('gives away', 'gave away', 'give away'),
         ('cleans', 'cleaned', 'clean'), ('watches', 'watched', 'watch'), ('shares', 'shared', 'share'))
WEATHER = ('sunny', 'rainy', 'windy', 'cold', 'warm', 'foggy', 'snowy', 'cloudy')
DAYS = ('Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday', 'Sunday')
CAPITALS = (('France', 'Paris'), ('Japan', 'Tokyo'), ('Kenya', 'Nairobi'), ('Peru', 'Lima'),
            ('Italy', 'Rome'), ('Egypt', 'Cairo'), ('Canada', 'Ottawa'), ('Spain', 'Madrid'),
            ('India', 'New Delhi'), ('Norway', 'Oslo'), ('Chile', 'Santiago'), ('Greece', 'Athens'),
            ('Ghana', 'Accra'), ('Brazil', 'Brasilia'), ('Poland', 'Warsaw'), ('Vietnam', 'Hanoi'))
COLOURS = (('grass', 'green'), ('the sky', 'blue'), ('snow', 'white'), ('coal', 'black'),
           ('a banana', 'yellow'), ('a tomato', 'red'), ('an orange', 'orange'),
           ('a plum', 'purple'), ('milk', 'white'), ('chocolate', 'brown'))
OPPOSITES = (('hot', 'cold'), ('big', 'small'), ('up', 'down'), ('fast', 'slow'), ('old', 'new'),
             ('happy', 'sad'), ('light', 'dark'), ('open', 'closed'), ('early', 'late'),
             ('full', 'empty'), ('hard', 'soft'), ('near', 'far'), ('loud', 'quiet'))
PLURALS = (('cat', 'cats'), ('box', 'boxes'), ('mouse', 'mice'), ('child', 'children'),
           ('foot', 'feet'), ('city', 'cities'), ('leaf', 'leaves'), ('sheep', 'sheep'),
           ('person', 'people'), ('tooth', 'teeth'), ('bus', 'buses'), ('knife', 'knives'))
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine',
                'ten', 'eleven', 'twelve', 'thirteen', 'fourteen', 'fifteen', 'sixteen',
                'seventeen', 'eighteen', 'nineteen', 'twenty')


def _article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def _thing(rng: random.Random) -> str:
  adjective, noun = rng.choice(ADJECTIVES), rng.choice(OBJECTS)
  return f'{_article(adjective)} {adjective} {noun}'


def _rng(seed: int, index: int, kind: str = 'doc') -> random.Random:
  return random.Random(f'meshlm-{kind}-{seed}-{index}')


def _story(rng: random.Random) -> str:
  name, friend = rng.sample(NAMES, 2)
  he, his = PRONOUN[name], POSSESSIVE[PRONOUN[name]]
  animal, place, day = rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(DAYS)
  verb, thing = rng.choice(VERBS), _thing(rng)
  if rng.random() < 0.5:  # In the past tense.
    lines = [f'On {day}, {name} went to {place}. The weather was {rng.choice(WEATHER)}.',
             f'There, {he} {verb[1]} {thing}.',
             f'{he.capitalize()} showed it to {friend} and {his} {animal}.',
             f'{friend} was {rng.choice(FEELINGS)}, and the {animal} was {rng.choice(FEELINGS)}.']
    if rng.random() < 0.6:
      count, other, near = rng.randint(2, 9), rng.choice(ANIMALS), rng.choice(PLACES)
      plural = other + ('es' if other[-1] in 'sxh' else 's')
      lines.append(f'Later they counted {count} {plural} near {near}.')
    lines.append(f'At the end of the day, {name} felt {rng.choice(FEELINGS)} and went home.')
    return ' '.join(lines)
  s = '' if he == 'they' else 's'
  return ' '.join([f'Every {day}, {name} walk{s} to {place} with {his} {animal}.',
                   f'Today {he} {"carry" if he == "they" else "carries"} {thing}.',
                   f'{friend} {verb[0]} {_thing(rng)} and laughs.',
                   f'"Look at the {animal}!" says {friend}. "It looks {rng.choice(FEELINGS)}."',
                   f'{name} smile{s}, because the day is {rng.choice(WEATHER)}.'])


def _arithmetic(rng: random.Random) -> str:
  lines = []
  for _ in range(rng.randint(3, 10)):
    op = rng.choice('+-*')
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if op == '*':
      a, b = rng.randint(0, 12), rng.randint(0, 12)
    elif op == '-':
      a, b = max(a, b), min(a, b)
    result, word = {'+': (a + b, 'plus'), '-': (a - b, 'minus'), '*': (a * b, 'times')}[op]
    in_words = rng.random() < 0.3
    lines.append(f'{a} {word} {b} is {result}.' if in_words else f'{a} {op} {b} = {result}')
  return '\n'.join(lines)


def _table(rng: random.Random) -> str:
  n, first = rng.randint(2, 25), rng.randint(1, 20)
  rows = range(first, first + rng.randint(4, 10))
  if rng.random() < 0.5:
    return f'Times table of {n}:\n' + '\n'.join(f'{n} x {k} = {n * k}' for k in rows)
  return f'Multiples of {n}:\n' + '\n'.join(f'{n} times {k} is {n * k}.' for k in rows)


def _counting(rng: random.Random) -> str:
  start, step, n = rng.randint(0, 80), rng.choice((1, 1, 2, 3, 5, 10)), rng.randint(5, 12)
  numbers = ', '.join(str(start + step * k) for k in range(n))
  if rng.random() < 0.5:
    lo = rng.randint(0, 10)
    words = ' '.join(NUMBER_WORDS[lo:lo + rng.randint(3, 10)])
    return f'Counting by {step} from {start}: {numbers}.\nIn words: {words}.'
  return f'Counting by {step} from {start}: {numbers}.'


def _list(rng: random.Random) -> str:
  name = rng.choice(NAMES)
  title = rng.choice(('Shopping list', 'Things to pack', 'Today', 'Gifts'))
  items = rng.sample(OBJECTS, rng.randint(3, 7))
  body = '\n'.join(f'{k}. {rng.randint(1, 5)} x {item}' if rng.random() < 0.5 else f'- {item}'
                   for k, item in enumerate(items, 1))
  return f'{title} for {name}:\n{body}\nThat is {len(items)} items.'


def _dialogue(rng: random.Random) -> str:
  a, b = rng.sample(NAMES, 2)
  thing, place = rng.choice(OBJECTS), rng.choice(PLACES)
  x, y = rng.randint(1, 20), rng.randint(1, 20)
  turns = [f'{a}: Hello {b}! How are you today?',
           f'{b}: I am {rng.choice(FEELINGS)}, thank you. And you?',
           f'{a}: I am going to {place}. Do you want to come?']
  if rng.random() < 0.5:
    turns += [f'{b}: Yes. Can you bring {_article(thing)} {thing}?',
              f'{a}: Of course. I have {x} of them.']
  else:
    turns += [f'{b}: Maybe. What is {x} + {y}?', f'{a}: {x} + {y} = {x + y}.',
              f'{b}: Correct! Let us go.']
  turns.append(f'{a}: See you at {place}.')
  return '\n'.join(turns)


_FACTS = ((CAPITALS, 'The capital of {} is {}.'), (COLOURS, 'The colour of {} is {}.'),
          (OPPOSITES, 'The opposite of {} is {}.'), (PLURALS, 'One {}, two {}.'))


def _facts(rng: random.Random) -> str:
  lines = []
  for _ in range(rng.randint(3, 7)):
    table, text = _FACTS[rng.randrange(4)]
    lines.append(text.format(*rng.choice(table)))
  return ' '.join(lines)


_KINDS = ((_story, 36), (_arithmetic, 16), (_table, 4), (_counting, 6), (_list, 8),
          (_dialogue, 14), (_facts, 16))
_GENERATORS, _WEIGHTS = zip(*_KINDS)


def document(seed: int, index: int) -> str:
  """Document `index` of the corpus drawn with `seed`; a pure function of both."""
  rng = _rng(seed, index)
  parts = [rng.choices(_GENERATORS, weights=_WEIGHTS)[0](rng)]
  # Some documents join two pieces so that lengths vary more.
  if rng.random() < 0.25:
    parts.append(rng.choices(_GENERATORS, weights=_WEIGHTS)[0](rng))
  return '\n\n'.join(parts)


def documents(seed: int = 0, num_docs: int = 20_000) -> list[str]:
  """Documents `0 .. num_docs - 1` drawn with `seed` (about 230 bytes each)."""
  return [document(seed, i) for i in range(num_docs)]


def _question(rng: random.Random) -> tuple[str, str]:
  """A question and its one right answer (a short string that can be checked exactly)."""
  kind = rng.randrange(6)
  if kind == 0:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f'What is {a} + {b}?', str(a + b)
  if kind == 1:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return f'What is {a} - {b}?', str(a - b)
  if kind == 2:
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    return f'What is {a} times {b}?', str(a * b)
  if kind in (3, 4):
    table, what = (CAPITALS, 'capital') if kind == 3 else (OPPOSITES, 'opposite')
    subject, answer = rng.choice(table)
    return f'What is the {what} of {subject}?', answer
  lo = rng.randint(0, 30)
  hi = lo + rng.randint(2, 6)
  return f'Count from {lo} to {hi}.', ', '.join(str(k) for k in range(lo, hi + 1))


def _wrong(rng: random.Random, answer: str) -> str:
  """A plausible wrong answer to the same question."""
  if answer.lstrip('-').isdigit():
    return str(int(answer) + rng.choice((-3, -2, -1, 1, 2, 10)))
  if ', ' in answer:
    numbers = answer.split(', ')
    del numbers[rng.randrange(1, len(numbers))]
    return ', '.join(numbers)
  pool = [c for _, c in CAPITALS] + [o for _, o in OPPOSITES]
  return rng.choice([w for w in pool if w != answer])


def instructions(seed: int = 0, num: int = 1_000) -> list[dict[str, str]]:
  """Instruction/response pairs: `{'prompt', 'response', 'answer'}`; `answer` is checkable."""
  out = []
  for i in range(num):
    rng = _rng(seed, i, 'instruction')
    question, answer = _question(rng)
    response = answer if rng.random() < 0.5 else f'The answer is {answer}.'
    out.append({'prompt': question, 'response': response, 'answer': answer})
  return out


def preferences(seed: int = 0, num: int = 1_000) -> list[dict[str, str]]:
  """Preference pairs `{'prompt', 'chosen', 'rejected', 'answer'}`: chosen is right, rejected wrong."""
  out = []
  for i in range(num):
    rng = _rng(seed, i, 'preference')
    question, answer = _question(rng)
    out.append({'prompt': question, 'chosen': f'The answer is {answer}.',
                'rejected': f'The answer is {_wrong(rng, answer)}.', 'answer': answer})
  return out
