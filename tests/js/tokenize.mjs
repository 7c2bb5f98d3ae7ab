// node tests/js/tokenize.mjs TOKENIZER_JSON < strings.json  ->  ids of each string (JSON), as the browser computes them
import { readFileSync } from "node:fs";
import { Tokenizer } from "../../node_modules/@huggingface/tokenizers/dist/tokenizers.min.mjs";

const tokenizer = new Tokenizer(JSON.parse(readFileSync(process.argv[2], "utf8")), {});
const strings = JSON.parse(readFileSync(0, "utf8"));
console.log(JSON.stringify(strings.map((s) => tokenizer.encode(s, { add_special_tokens: false }).ids.map(Number))));
