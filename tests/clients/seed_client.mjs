// The seed LLM server's JavaScript client as its docs write it: fetch, then a reader over the
// response body's server-sent events. Run by tests/integration/test_seed_api.py with Node's own
// fetch (Node >= 18): `node seed_client.mjs BASE_URL PROMPT` prints one JSON object.

async function generate(baseUrl, prompt, options = {}) {
  const response = await fetch(`${baseUrl}/generate`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt, ...options }),
  });
  if (!response.ok) throw new Error(`HTTP ${response.status}: ${await response.text()}`);
  return await response.json();
}

async function streamGenerate(baseUrl, prompt, options = {}, onToken = () => {}) {
  const response = await fetch(`${baseUrl}/generate`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt, ...options, stream: true }),
  });
  if (!response.ok) throw new Error(`HTTP ${response.status}: ${await response.text()}`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop(); // an incomplete line waits for the next read
    for (const line of lines) {
      if (!line.startsWith("data: ")) continue;
      const event = JSON.parse(line.slice(6));
      if (event.final) {
        await reader.cancel();
        return event;
      }
      onToken(event.text, event);
    }
  }
  throw new Error("the stream ended without its final event");
}

async function chat(baseUrl, messages, options = {}) {
  const response = await fetch(`${baseUrl}/chat`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ messages, ...options }),
  });
  if (!response.ok) throw new Error(`HTTP ${response.status}: ${await response.text()}`);
  return await response.json();
}

const [baseUrl, prompt] = process.argv.slice(2);
const options = { max_tokens: 16, temperature: 0, metadata: { client: "js" } };
const whole = await generate(baseUrl, prompt, options);
let text = "";
let events = 0;
const final = await streamGenerate(baseUrl, prompt, options, (t) => {
  text += t;
  events += 1;
});
const reply = await chat(baseUrl, [{ role: "user", content: prompt }], { max_tokens: 8, temperature: 0 });
console.log(JSON.stringify({ whole, streamed: { text, events, final }, chat: reply }));
