// The Node.js OpenAI SDK and fetch against the proxy, as a JavaScript application would use them.
// Usage: node clients.mjs <base url> <token> <token with max_requests=1>; prints one JSON object.
import OpenAI from "openai";

const [baseURL, token, quotaToken] = process.argv.slice(2);
const result = {};

const image = Buffer.alloc(15 * 1024 * 1024).toString("base64"); // 20 MB once encoded
const messages = [
  {
    role: "user",
    content: [
      { type: "text", text: "What is in this picture?" },
      { type: "image_url", image_url: { url: `data:image/png;base64,${image}` } },
    ],
  },
];

const client = new OpenAI({ baseURL, apiKey: token, maxRetries: 0 });
const stream = await client.chat.completions.create({ model: "gpt-4o", messages, stream: true });
let content = "";
let chunks = 0;
let usageChunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  if (chunk.choices.length === 0) usageChunks += 1;
  content += chunk.choices[0]?.delta?.content ?? "";
}
result.vision = { chunks, usageChunks, content };

// A streamed request body, as fetch sends it: chunked, no Content-Length.
const body = JSON.stringify({ model: "gpt-4o", messages, stream: true });
const pieces = new ReadableStream({
  start(controller) {
    const bytes = new TextEncoder().encode(body);
    for (let at = 0; at < bytes.length; at += 256 * 1024) {
      controller.enqueue(bytes.subarray(at, at + 256 * 1024));
    }
    controller.close();
  },
});
const response = await fetch(`${baseURL}/chat/completions`, {
  method: "POST",
  headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
  body: pieces,
  duplex: "half",
});
const text = await response.text();
result.chunked = { status: response.status, done: text.includes("data: [DONE]") };

let attempts = 0;
const counting = new OpenAI({
  baseURL,
  apiKey: quotaToken,
  maxRetries: 2,
  fetch: (url, init) => {
    attempts += 1;
    return fetch(url, init);
  },
});
await counting.models.list();
try {
  await counting.models.list();
  result.quota = { refused: false };
} catch (error) {
  result.quota = { refused: true, status: error.status, code: error.code, attempts };
}
console.log(JSON.stringify(result));
