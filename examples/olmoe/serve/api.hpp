// The OpenAI-compatible request and response shapes of `olmoe serve`:
// parsing a /v1/completions or /v1/chat/completions body into a
// request_params (every check that can fail with 400 happens here, before
// the request is queued), the error object, and the response JSON.
//
// Fields read: model (echoed only), prompt (a string, a list of token ids,
// or a list holding one of those), messages (chat), max_tokens
// (max_completion_tokens for chat), temperature, top_p, top_k, seed, stop,
// stream, n (1 only); the extensions k, k_schedule, threshold and
// return_token_ids. Every other field is ignored, as OpenAI's API does with
// fields it does not know.
#pragma once

#include "../config.hpp"
#include "../schedule.hpp"
#include "sampler.hpp"

#include <kdial/io/tokenizer.hpp>
#include <kdial/routing/threshold.hpp>

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

namespace olmoe::serve {

using json = nlohmann::json;

// An error answered with `status` and an OpenAI-style body
// {"error": {"message", "type", "param", "code"}}.
struct api_error : std::runtime_error {
    int status;
    std::string type, param, code;
    api_error(int s, std::string message, std::string param_ = "", std::string code_ = "",
        std::string type_ = "invalid_request_error")
        : std::runtime_error(std::move(message))
        , status(s)
        , type(std::move(type_))
        , param(std::move(param_))
        , code(std::move(code_))
    {
    }
    json body() const
    {
        return { { "error",
            { { "message", what() }, { "type", type }, { "param", param.empty() ? json(nullptr) : json(param) },
                { "code", code.empty() ? json(nullptr) : json(code) } } } };
    }
};

enum class endpoint { completions, chat };

// What a request asks for, validated against the model and the server.
struct request_params {
    endpoint kind = endpoint::completions;
    std::string model;
    std::vector<std::int32_t> prompt;
    int max_tokens = 16;
    sampling_params sampling;
    bool seeded = false;
    std::vector<std::string> stop;
    bool stream = false;
    bool return_token_ids = false;
    // The dial: a k per layer, or threshold routing; neither: the policy's k.
    std::vector<int> ks;
    std::optional<kdial::threshold_options> threshold;
};

// The server's limits a request is checked against.
struct limits {
    std::size_t ctx = 2048; // positions of one slot's KV cache
};

// The plain chat template (the checkpoint's own Jinja template is not
// evaluated): every message as "<|role|>\n" + content + "\n", then
// "<|assistant|>\n" (the Tulu layout of OLMoE's instruct models). Roles:
// system, user, assistant (developer is read as system).
inline std::string chat_prompt(const json& messages)
{
    if (!messages.is_array() || messages.empty())
        throw api_error(400, "'messages' must be a non-empty array", "messages");
    std::string s;
    for (std::size_t i = 0; i < messages.size(); ++i) {
        const json& m = messages[i];
        const std::string p = "messages[" + std::to_string(i) + "]";
        if (!m.is_object())
            throw api_error(400, p + " must be an object", p);
        const auto r = m.find("role");
        if (r == m.end() || !r->is_string())
            throw api_error(400, p + ".role must be a string", p + ".role");
        std::string role = r->get<std::string>();
        if (role == "developer")
            role = "system";
        if (role != "system" && role != "user" && role != "assistant")
            throw api_error(400, p + ".role '" + role + "' is not one of system, user, assistant", p + ".role");
        std::string content;
        const auto c = m.find("content");
        if (c == m.end() || c->is_null())
            content = "";
        else if (c->is_string())
            content = c->get<std::string>();
        else if (c->is_array()) { // [{"type": "text", "text": ...}]
            for (const json& part : *c) {
                if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text")
                    || !part["text"].is_string())
                    throw api_error(400, p + ".content: only text parts are supported", p + ".content");
                content += part["text"].get<std::string>();
            }
        } else
            throw api_error(400, p + ".content must be a string or a list of text parts", p + ".content");
        s += "<|" + role + "|>\n" + content + "\n";
    }
    return s + "<|assistant|>\n";
}

namespace detail {

inline const json* field(const json& j, const char* name)
{
    const auto it = j.find(name);
    return it == j.end() || it->is_null() ? nullptr : &*it;
}

inline long long get_int(const json& v, const char* name)
{
    if (!v.is_number_integer())
        throw api_error(400, std::string("'") + name + "' must be an integer", name);
    return v.get<long long>();
}

inline double get_number(const json& v, const char* name)
{
    if (!v.is_number())
        throw api_error(400, std::string("'") + name + "' must be a number", name);
    return v.get<double>();
}

inline std::vector<std::int32_t> token_list(const json& v, int vocab)
{
    std::vector<std::int32_t> ids;
    for (const json& t : v) {
        if (!t.is_number_integer())
            throw api_error(400, "'prompt' must be a string or a list of token ids", "prompt");
        const long long id = t.get<long long>();
        if (id < 0 || id >= vocab)
            throw api_error(400,
                "'prompt': token id " + std::to_string(id) + " is outside [0, vocab_size = " + std::to_string(vocab)
                    + ")",
                "prompt");
        ids.push_back(std::int32_t(id));
    }
    return ids;
}

} // namespace detail

// Parses and checks a request body. Throws api_error (400) naming the field.
inline request_params parse_request(const std::string& body, endpoint kind, const model_config& c,
    const kdial::io::bpe_tokenizer* tok, const limits& lim)
{
    using detail::field;
    json j;
    try {
        j = json::parse(body);
    } catch (const json::exception& e) {
        throw api_error(400, std::string("the request body is not valid JSON: ") + e.what());
    }
    if (!j.is_object())
        throw api_error(400, "the request body must be a JSON object");
    request_params r;
    r.kind = kind;
    if (const json* m = field(j, "model")) {
        if (!m->is_string())
            throw api_error(400, "'model' must be a string", "model");
        r.model = m->get<std::string>();
    }
    if (const json* n = field(j, "n"); n && detail::get_int(*n, "n") != 1)
        throw api_error(400, "only n = 1 is supported", "n", "unsupported_value");
    if (const json* n = field(j, "best_of"); n && detail::get_int(*n, "best_of") != 1)
        throw api_error(400, "only best_of = 1 is supported", "best_of", "unsupported_value");

    // The prompt.
    auto need_tok = [&](const char* what) {
        if (!tok)
            throw api_error(400,
                std::string("this model has no tokenizer.json, so ") + what
                    + " cannot be tokenized; send 'prompt' as a list of token ids",
                kind == endpoint::chat ? "messages" : "prompt");
    };
    if (kind == endpoint::completions) {
        const json* p = field(j, "prompt");
        if (!p)
            throw api_error(400, "'prompt' is required", "prompt");
        const json* v = p;
        if (p->is_array() && !p->empty() && (p->at(0).is_string() || p->at(0).is_array())) {
            if (p->size() != 1)
                throw api_error(400, "only one prompt per request is supported", "prompt", "unsupported_value");
            v = &p->at(0);
        }
        if (v->is_string()) {
            need_tok("a text prompt");
            r.prompt = tok->encode(v->get<std::string>());
        } else if (v->is_array())
            r.prompt = detail::token_list(*v, c.vocab);
        else
            throw api_error(400, "'prompt' must be a string or a list of token ids", "prompt");
    } else {
        const json* m = field(j, "messages");
        if (!m)
            throw api_error(400, "'messages' is required", "messages");
        const std::string text = chat_prompt(*m);
        need_tok("messages");
        r.prompt = tok->encode(text);
    }
    if (r.prompt.empty())
        throw api_error(400, "the prompt encodes to no tokens", kind == endpoint::chat ? "messages" : "prompt");
    if (r.prompt.size() >= lim.ctx)
        throw api_error(400,
            "the prompt has " + std::to_string(r.prompt.size()) + " tokens; this server's context is "
                + std::to_string(lim.ctx) + " tokens (--ctx), prompt and completion included",
            kind == endpoint::chat ? "messages" : "prompt", "context_length_exceeded");

    // Length and sampling.
    const std::size_t room = lim.ctx - r.prompt.size();
    const json* mt = field(j, "max_tokens");
    if (!mt && kind == endpoint::chat)
        mt = field(j, "max_completion_tokens");
    const char* mt_name = mt && mt == field(j, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    if (mt) {
        const long long v = detail::get_int(*mt, mt_name);
        if (v < 1)
            throw api_error(
                400, std::string("'") + mt_name + "' must be at least 1, got " + std::to_string(v), mt_name);
        if (std::size_t(v) > room)
            throw api_error(400,
                "the prompt has " + std::to_string(r.prompt.size()) + " tokens and " + mt_name + " is "
                    + std::to_string(v) + "; this server's context is " + std::to_string(lim.ctx)
                    + " tokens (--ctx), prompt and completion included",
                mt_name, "context_length_exceeded");
        r.max_tokens = int(v);
    } else
        r.max_tokens = kind == endpoint::chat ? int(room) : int(std::min<std::size_t>(16, room));
    if (const json* t = field(j, "temperature")) {
        const double v = detail::get_number(*t, "temperature");
        if (!(v >= 0 && v <= 2))
            throw api_error(400, "'temperature' must be in [0, 2]", "temperature");
        r.sampling.temperature = v;
    }
    if (const json* t = field(j, "top_p")) {
        const double v = detail::get_number(*t, "top_p");
        if (!(v > 0 && v <= 1))
            throw api_error(400, "'top_p' must be in (0, 1]", "top_p");
        r.sampling.top_p = v;
    }
    if (const json* t = field(j, "top_k")) {
        const long long v = detail::get_int(*t, "top_k");
        if (v < -1)
            throw api_error(400, "'top_k' must be >= 0 (0 or -1: no limit)", "top_k");
        r.sampling.top_k = int(std::min<long long>(std::max<long long>(v, 0), c.vocab));
    }
    if (const json* t = field(j, "seed")) {
        r.sampling.seed = std::uint64_t(detail::get_int(*t, "seed"));
        r.seeded = true;
    }
    if (const json* s = field(j, "stop")) {
        if (s->is_string())
            r.stop.push_back(s->get<std::string>());
        else if (s->is_array()) {
            for (const json& x : *s) {
                if (!x.is_string())
                    throw api_error(400, "'stop' must be a string or a list of strings", "stop");
                r.stop.push_back(x.get<std::string>());
            }
        } else
            throw api_error(400, "'stop' must be a string or a list of strings", "stop");
        if (r.stop.size() > 4)
            throw api_error(400, "'stop' has more than 4 sequences", "stop");
        std::erase(r.stop, std::string());
    }
    for (const char* b : { "stream", "return_token_ids" })
        if (const json* s = field(j, b)) {
            if (!s->is_boolean())
                throw api_error(400, std::string("'") + b + "' must be a boolean", b);
            (std::string(b) == "stream" ? r.stream : r.return_token_ids) = s->get<bool>();
        }

    // The dial.
    const json* k = field(j, "k");
    const json* ks = field(j, "k_schedule");
    const json* th = field(j, "threshold");
    if (int(k != nullptr) + int(ks != nullptr) + int(th != nullptr) > 1)
        throw api_error(400, "give at most one of 'k', 'k_schedule' and 'threshold'", k ? "k" : "k_schedule");
    const std::string kr = "[1, num_experts = " + std::to_string(c.experts) + "]";
    if (k) {
        const long long v = detail::get_int(*k, "k");
        if (v < 1 || v > c.experts)
            throw api_error(400, "'k' = " + std::to_string(v) + " is outside " + kr, "k");
        r.ks.assign(std::size_t(c.layers), int(v));
    } else if (ks) {
        if (ks->is_string()) {
            try {
                r.ks = parse_k_schedule(ks->get<std::string>(), c.layers, c.experts);
            } catch (const kdial::error& e) {
                std::string msg = e.what();
                if (msg.rfind("--k-schedule", 0) == 0)
                    msg = "'k_schedule'" + msg.substr(12);
                throw api_error(400, msg, "k_schedule");
            }
        } else if (ks->is_array()) {
            if (ks->size() != std::size_t(c.layers))
                throw api_error(400,
                    "'k_schedule' has " + std::to_string(ks->size()) + " entries; the model has "
                        + std::to_string(c.layers) + " layers",
                    "k_schedule");
            for (const json& x : *ks) {
                const long long v = detail::get_int(x, "k_schedule");
                if (v < 1 || v > c.experts)
                    throw api_error(400, "'k_schedule': k = " + std::to_string(v) + " is outside " + kr, "k_schedule");
                r.ks.push_back(int(v));
            }
        } else
            throw api_error(400,
                "'k_schedule' must be a list of integers (one per layer) or a string such as \"4@0-7\"", "k_schedule");
    } else if (th) {
        if (!th->is_object())
            throw api_error(400, "'threshold' must be an object {p, k_min, k_max}", "threshold");
        kdial::threshold_options o { 0.5f, 1, c.top_k };
        const json* p = field(*th, "p");
        if (!p)
            throw api_error(400, "'threshold.p' is required", "threshold.p");
        const double pv = detail::get_number(*p, "threshold.p");
        if (!(pv >= 0 && pv <= 1))
            throw api_error(400, "'threshold.p' must be in [0, 1]", "threshold.p");
        o.p = float(pv);
        if (const json* x = field(*th, "k_min"))
            o.k_min = int(std::clamp<long long>(detail::get_int(*x, "threshold.k_min"), -1, 1 << 30));
        if (const json* x = field(*th, "k_max"))
            o.k_max = int(std::clamp<long long>(detail::get_int(*x, "threshold.k_max"), -1, 1 << 30));
        if (!(o.k_min >= 1 && o.k_min <= o.k_max && o.k_max <= c.experts))
            throw api_error(400,
                "'threshold': need 1 <= k_min <= k_max <= num_experts = " + std::to_string(c.experts) + ", got k_min "
                    + std::to_string(o.k_min) + ", k_max " + std::to_string(o.k_max),
                "threshold");
        r.threshold = o;
    }
    return r;
}

// The longest suffix of `text` that is a proper prefix of a stop string:
// text that must be held back from a stream until it is known not to start
// a stop sequence.
inline std::size_t stop_holdback(const std::string& text, const std::vector<std::string>& stops)
{
    std::size_t hold = 0;
    for (const auto& s : stops)
        for (std::size_t n = std::min(s.size() - 1, text.size()); n > hold; --n)
            if (text.compare(text.size() - n, n, s, 0, n) == 0) {
                hold = n;
                break;
            }
    return hold;
}

} // namespace olmoe::serve
