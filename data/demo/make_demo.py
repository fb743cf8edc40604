"""Regenerate the bundled demo data and its tokenizer: `python data/demo/make_demo.py`.

Everything here is templated Chinese text drawn with one seeded `random.Random`, so the files are
identical on every run. The sets play the parts of the study's data at a size a tiny model learns on CPU:
- roleplay_all_train/test: one character, 小铃, with a speaking style a model can pick up (she calls
  herself 本喵, opens with a little interjection and ends sentences with 喵～); 0-3 past turns of history.
  Test records are combinations that never occur in train.
- alpaca_gpt4_zh: neutral general-knowledge instructions (capitals, arithmetic, animals, unit conversions,
  opposites, colours, English words). The first 100 records (the ones evaluated) cycle through every kind.
- chat_aux_zh: multi-turn neutral chat built from alpaca records 100+ and small talk, disjoint from the
  first 100 alpaca records.
- ice_text.model: a sentencepiece BPE model with ChatGLM's special pieces at the ids the 'tiny' preset uses.
"""
import hashlib
import io
import json
import random
from pathlib import Path

import sentencepiece as spm

HERE = Path(__file__).resolve().parent
SEED = 1234

# ---------------------------------------------------------------- role-play: 小铃

FOODS = ["小鱼干", "牛奶", "草莓蛋糕", "饺子", "包子", "西瓜", "苹果", "烤红薯", "面条", "布丁", "三明治", "冰淇淋",
         "煎蛋", "米饭", "豆浆", "馒头"]
PLACES = ["公园", "图书馆", "海边", "山上", "菜市场", "学校", "小河边", "屋顶", "花园", "商店", "车站", "湖边"]
ACTS = ["看书", "睡午觉", "晒太阳", "钓鱼", "画画", "唱歌", "散步", "做饭", "打扫房间", "写日记", "种花", "追蝴蝶"]
TIMES = ["今天", "明天", "周末", "晚上", "早上", "下午", "放学以后", "过年的时候"]
WEATHERS = ["下雨", "出太阳", "刮大风", "下雪", "阴天", "打雷"]
THINGS = ["毛线球", "纸箱子", "铃铛", "小镜子", "围巾", "风筝", "雨伞", "枕头"]
OPENERS = ["哼哼，", "嘿嘿，", "哎呀，", "嗯哼，", ""]

# Each intent: (query templates, answer templates). Slots are filled from the lists above.
INTENTS = {
    "greet": (["你好呀。", "小铃，早上好！", "好久不见，你最近怎么样？", "嗨，小铃在吗？"],
              ["{o}本喵一直都在这里等你喵～", "{o}本喵今天精神很好喵～你也要开心哦喵～",
               "{o}本喵刚刚{act}完，正想找你玩呢喵～"]),
    "food": (["你喜欢吃{food}吗？", "{time}想吃什么？", "要不要尝尝我做的{food}？", "你最爱的食物是什么？"],
             ["{o}本喵最喜欢{food}了，一口气能吃三份喵～", "{o}{food}的话，本喵可以勉强尝一口喵～",
              "{o}本喵{time}只想吃{food}喵～谁都不许抢喵～"]),
    "weather": (["{time}会{weather}吗？", "外面在{weather}，你怕不怕？", "{weather}的时候你做什么？"],
                ["{o}{weather}的话，本喵就躲在{thing}里{act}喵～", "{o}本喵才不怕{weather}呢喵～只是有一点点讨厌喵～",
                 "{o}本喵看过了，{time}大概会{weather}喵～记得带{thing}喵～"]),
    "hobby": (["你平时喜欢做什么？", "你会{act}吗？", "我们一起去{act}好不好？"],
              ["{o}本喵最擅长{act}了喵～", "{o}本喵可以陪你去{act}，不过要先给本喵{food}喵～",
               "{o}{act}？本喵当然会，本喵可是天才喵～"]),
    "place": (["你去过{place}吗？", "{time}去{place}怎么样？", "{place}好玩吗？"],
              ["{o}本喵在{place}{act}过好多次了喵～", "{o}{place}很好玩喵～那里还有卖{food}的喵～",
               "{o}去{place}可以，但是本喵要坐在你的肩膀上喵～"]),
    "gift": (["我给你带了一个{thing}。", "你想要什么礼物？", "这个{thing}送给你。"],
             ["{o}{thing}！本喵收下了，谢谢你喵～", "{o}本喵想要一个{thing}，还有好多{food}喵～",
              "{o}本喵会好好珍惜这个{thing}的喵～"]),
    "praise": (["小铃真可爱。", "你今天好漂亮！", "你真聪明。"],
               ["{o}那、那是当然的喵～本喵一直都很可爱喵～", "{o}被你夸得本喵的尾巴都翘起来了喵～",
                "{o}本喵知道的喵～不过你可以多说几遍喵～"]),
    "bye": (["我要走了，再见。", "晚安，小铃。", "我{time}再来看你。"],
            ["{o}早点回来喵～本喵会在{place}等你喵～", "{o}晚安喵～梦里也要记得本喵喵～",
             "{o}说好了喵～{time}不来的话本喵会生气的喵～"]),
}


def draw_slots(rng: random.Random) -> dict:
    return {"food": rng.choice(FOODS), "place": rng.choice(PLACES), "act": rng.choice(ACTS),
            "time": rng.choice(TIMES), "weather": rng.choice(WEATHERS), "thing": rng.choice(THINGS),
            "o": rng.choice(OPENERS)}


def roleplay_turn(rng: random.Random) -> tuple[str, str]:
    queries, answers = INTENTS[rng.choice(sorted(INTENTS))]
    slots = draw_slots(rng)
    return rng.choice(queries).format(**slots), rng.choice(answers).format(**slots)


def roleplay_record(rng: random.Random) -> dict:
    turns = [roleplay_turn(rng) for _ in range(rng.choice([1, 1, 2, 2, 3, 4]))]
    query, answer = turns[-1]
    return {"instruction": query, "input": "", "output": answer, "history": [list(t) for t in turns[:-1]]}


def roleplay_sets(rng: random.Random, n_train: int, n_test: int) -> tuple[list, list]:
    train, seen = [], set()
    while len(train) < n_train:
        r = roleplay_record(rng)
        key = (r["instruction"], r["output"])
        if key not in seen:  # every final (query, answer) pair occurs once
            seen.add(key)
            train.append(r)
    test = []
    while len(test) < n_test:
        r = roleplay_record(rng)
        key = (r["instruction"], r["output"])
        if key not in seen:  # a combination train never answers
            seen.add(key)
            test.append(r)
    return train, test


# ---------------------------------------------------------------- general knowledge (alpaca's part)

CAPITALS = {"中国": "北京", "日本": "东京", "法国": "巴黎", "英国": "伦敦", "德国": "柏林", "意大利": "罗马",
            "俄罗斯": "莫斯科", "美国": "华盛顿", "加拿大": "渥太华", "澳大利亚": "堪培拉", "韩国": "首尔",
            "埃及": "开罗", "印度": "新德里", "西班牙": "马德里", "泰国": "曼谷", "越南": "河内", "希腊": "雅典",
            "葡萄牙": "里斯本", "荷兰": "阿姆斯特丹", "瑞典": "斯德哥尔摩", "挪威": "奥斯陆", "芬兰": "赫尔辛基",
            "波兰": "华沙", "土耳其": "安卡拉", "肯尼亚": "内罗毕", "新西兰": "惠灵顿", "爱尔兰": "都柏林",
            "古巴": "哈瓦那", "秘鲁": "利马", "蒙古": "乌兰巴托"}
ANIMALS = {"猫": "哺乳动物", "狗": "哺乳动物", "鲸鱼": "哺乳动物", "蝙蝠": "哺乳动物", "老虎": "哺乳动物",
           "企鹅": "鸟类", "麻雀": "鸟类", "老鹰": "鸟类", "鸭子": "鸟类", "鲨鱼": "鱼类", "金鱼": "鱼类",
           "鲤鱼": "鱼类", "青蛙": "两栖动物", "蝾螈": "两栖动物", "蛇": "爬行动物", "乌龟": "爬行动物",
           "鳄鱼": "爬行动物", "蜥蜴": "爬行动物", "蜜蜂": "昆虫", "蚂蚁": "昆虫", "蝴蝶": "昆虫"}
UNITS = [("千米", "米", 1000), ("米", "厘米", 100), ("小时", "分钟", 60), ("分钟", "秒", 60), ("千克", "克", 1000),
         ("天", "小时", 24), ("周", "天", 7), ("年", "个月", 12)]
OPPOSITES = {"大": "小", "高": "矮", "快": "慢", "冷": "热", "长": "短", "新": "旧", "多": "少", "上": "下",
             "左": "右", "前": "后", "开": "关", "黑": "白", "胖": "瘦", "早": "晚", "远": "近", "深": "浅",
             "轻": "重", "买": "卖", "来": "去", "哭": "笑", "真": "假", "进": "出", "强": "弱", "甜": "苦"}
COLOURS = {"晴朗的天空": "蓝色", "青草": "绿色", "雪": "白色", "成熟的香蕉": "黄色", "乌鸦": "黑色",
           "成熟的西红柿": "红色", "橙子": "橙色", "茄子": "紫色", "煤炭": "黑色", "牛奶": "白色", "血液": "红色",
           "夏天的树叶": "绿色", "柠檬": "黄色", "熊猫的耳朵": "黑色", "棉花": "白色", "胡萝卜": "橙色"}
ENGLISH = {"苹果": "apple", "猫": "cat", "狗": "dog", "书": "book", "水": "water", "太阳": "sun", "月亮": "moon",
           "朋友": "friend", "学校": "school", "老师": "teacher", "红色": "red", "房子": "house", "鱼": "fish",
           "花": "flower", "树": "tree", "雨": "rain", "桌子": "table", "椅子": "chair", "鸟": "bird", "星星": "star"}


def capital_items(rng):
    out = []
    for country, city in CAPITALS.items():
        for q in [f"{country}的首都是哪里？", f"请告诉我{country}的首都。", f"{country}的首都叫什么名字？"]:
            out.append((q, "", f"{country}的首都是{city}。"))
        out.append(("回答下面的问题。", f"{country}的首都是哪座城市？", f"{country}的首都是{city}。"))
    return out


def arithmetic_items(rng):
    out = []
    for _ in range(820):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["加", "减", "乘"])
        if op == "减" and b > a:
            a, b = b, a
        if op == "乘":
            b = rng.randint(2, 9)
        value = {"加": a + b, "减": a - b, "乘": a * b}[op]
        q = rng.choice([f"计算{a}{op}{b}等于多少。", f"{a}{op}{b}等于几？", f"请算一下{a}{op}{b}。"])
        out.append((q, "", f"{a}{op}{b}等于{value}。"))
    return out


def animal_items(rng):
    out = []
    for animal, kind in ANIMALS.items():
        for q in [f"{animal}属于哪一类动物？", f"请问{animal}是什么类别的动物？"]:
            out.append((q, "", f"{animal}属于{kind}。"))
        out.append(("判断下面的动物属于哪一类。", animal, f"{animal}属于{kind}。"))
    return out


def unit_items(rng):
    out = []
    for big, small, factor in UNITS:
        for n in range(1, 13):
            q = rng.choice([f"{n}{big}等于多少{small}？", f"把{n}{big}换算成{small}。"])
            out.append((q, "", f"{n}{big}等于{n * factor}{small}。"))
    return out


def lookup_items(table: dict, questions: list[str], instruction: str, answer: str) -> list[tuple]:
    """A word -> fact table as instruction records: each question template (with {w}), then the word as
    the input of a fixed instruction; `answer` is formatted with {w} and {v}."""
    out = []
    for w, v in table.items():
        for q in questions:
            out.append((q.format(w=w), "", answer.format(w=w, v=v)))
        out.append((instruction, w, answer.format(w=w, v=v)))
    return out


def opposite_items(rng):
    return lookup_items(OPPOSITES, ["“{w}”的反义词是什么？", "请写出“{w}”的反义词。"], "写出下面这个字的反义词。",
                        "“{w}”的反义词是“{v}”。")


def colour_items(rng):
    return lookup_items(COLOURS, ["{w}是什么颜色的？", "请说出{w}的颜色。"], "说出下面事物的颜色。", "{w}是{v}的。")


def english_items(rng):
    return lookup_items(ENGLISH, ["“{w}”用英语怎么说？", "把“{w}”翻译成英语。"], "把下面的词翻译成英语。",
                        "“{w}”的英语是{v}。")


def compare_items(rng):
    out = []
    for _ in range(240):
        a, b = rng.sample(range(1, 1000), 2)
        q = rng.choice([f"{a}和{b}哪个数更大？", f"比较{a}和{b}的大小。"])
        out.append((q, "", f"{max(a, b)}比{min(a, b)}大。"))
    return out


KINDS = [capital_items, arithmetic_items, animal_items, unit_items, opposite_items, colour_items, english_items,
         compare_items]


def alpaca_set(rng: random.Random, n: int) -> list[dict]:
    """Round-robin over the kinds first (so any prefix, in particular the evaluated first 100, covers all),
    each kind in its own shuffled order."""
    pools = []
    for kind in KINDS:
        items = list(dict.fromkeys(kind(rng)))
        rng.shuffle(items)
        pools.append(items)
    out = []
    while len(out) < n and any(pools):
        for pool in pools:
            if pool and len(out) < n:
                q, x, a = pool.pop()
                out.append({"instruction": q, "input": x, "output": a, "history": []})
    return out


# ---------------------------------------------------------------- auxiliary multi-turn chat

SMALL_TALK = [("你好。", "你好！有什么可以帮你的吗？"), ("谢谢你。", "不客气，很高兴能帮到你。"),
              ("你是谁？", "我是一个人工智能助手，可以回答各种问题。"), ("推荐一本书吧。", "可以读一读《西游记》，故事有趣，人物鲜明。"),
              ("今天有点累。", "注意休息，早点睡觉，明天会好一些。"), ("怎样才能学好数学？", "多做练习，弄懂每一个概念，再及时复习。"),
              ("给我讲个道理。", "做事要有耐心，一步一步来，积少成多。"), ("周末做什么好？", "可以去公园散步，也可以在家读书或运动。"),
              ("怎么保持健康？", "规律作息，均衡饮食，每天适当运动。"), ("再见。", "再见，祝你生活愉快！"),
              ("你会写诗吗？", "会一点。比如：春风吹绿柳，细雨润新花。"), ("如何节约用水？", "随手关紧水龙头，洗菜的水可以用来浇花。")]


def chat_aux_set(rng: random.Random, alpaca_rest: list[dict], n: int) -> list[dict]:
    """Each record: 1-4 turns drawn from small talk and from alpaca records after the first 100."""
    pool = [(r["instruction"] + r["input"], r["output"]) for r in alpaca_rest] + SMALL_TALK * 10
    out, seen = [], set()
    while len(out) < n:
        turns = [rng.choice(pool) for _ in range(rng.choice([1, 2, 2, 3, 3, 4]))]
        key = tuple(turns)
        if key in seen:
            continue
        seen.add(key)
        q, a = turns[-1]
        out.append({"instruction": q, "input": "", "output": a, "history": [list(t) for t in turns[:-1]]})
    return out


# ---------------------------------------------------------------- files

def dump(records: list[dict], path: Path) -> str:
    """One record per line: compact, diffable, still a plain JSON list. Returns the file's sha1."""
    text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"
    data = text.encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha1(data).hexdigest()


def tokenizer_corpus(sets: list[list[dict]]) -> list[str]:
    """The texts the model will see, in ChatGLM's preprocessed form (newlines are <n>, so the prompt
    scaffolding '[Round 0]<n>问：' becomes a few learned pieces)."""
    from model.tokenizer import preprocess  # same preprocessing the tokenizer applies at encode time

    lines = []
    for records in sets:
        for r in records:
            prompt = ""
            for i, (q, a) in enumerate(r["history"]):
                prompt += f"[Round {i}]\n问：{q}\n答：{a}\n"
            query = r["instruction"] + r["input"]
            prompt += f"[Round {len(r['history'])}]\n问：{query}\n答：" if r["history"] else query
            lines.append(preprocess(prompt))
            lines.append(preprocess(r["output"]))
    return lines


def train_tokenizer(lines: list[str], path: Path, vocab_size: int = 3000):
    """Ids 0-11 are the ones the 'tiny' preset hard-codes; then <n>, <|tab|>, <|blank_2..80|>, bytes, learned.
    BPE, because on this small corpus unigram stops at ~1,400 pieces and leaves role-play records ~60% longer."""
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
    user = specials + ["<n>", "<|tab|>"] + [f"<|blank_{k}|>" for k in range(2, 81)]
    buf = io.BytesIO()
    spm.set_random_generator_seed(SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        pad_piece="<pad>", user_defined_symbols=user, minloglevel=2)
    path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    expected = ["<unk>", "<s>", "</s>", "<pad>", "[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>",
                "<ENC>", "<dBLOCK>", "<n>", "<|tab|>"]
    got = [sp.id_to_piece(i) for i in range(len(expected))]
    assert got == expected, f"special pieces landed at the wrong ids: {got}"
    assert sp.get_piece_size() <= 4096, sp.get_piece_size()


def main():
    rng = random.Random(SEED)
    train, test = roleplay_sets(rng, 2000, 150)
    alpaca = alpaca_set(rng, 1500)
    aux = chat_aux_set(rng, alpaca[100:], 600)
    files = {"roleplay_all_train": ("roleplay_all_train.json", train),
             "roleplay_all_test": ("roleplay_all_test.json", test),
             "alpaca_gpt4_zh": ("alpaca_gpt4_zh.json", alpaca),
             "chat_aux_zh": ("chat_aux_zh.json", aux)}
    columns = {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}
    info = {}
    for name, (file_name, records) in files.items():
        info[name] = {"file_name": file_name, "file_sha1": dump(records, HERE / file_name), "columns": columns}
        print(f"{name}: {len(records)} records -> {file_name}")
    (HERE / "dataset_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    train_tokenizer(tokenizer_corpus([train, test, alpaca, aux]), HERE / "ice_text.model")
    print(f"ice_text.model: sha1 {hashlib.sha1((HERE / 'ice_text.model').read_bytes()).hexdigest()}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE.parent.parent))  # the repo root, for model.tokenizer.preprocess
    main()
