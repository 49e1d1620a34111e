// c-counter: the C twin of examples/kv-counter. A `wasi:http` component that counts requests in
// `wasi:keyvalue`: each request atomically increments a key and answers `c count: N`. The key is
// the request path without its leading `/` and query (any character outside `A-Z a-z 0-9 _ -`
// becomes `_`), or `count` for `/`. The bucket is opened with the empty identifier, so the
// component's assignment decides which bucket that is. A key-value error answers 500 with its text
// (`access-denied`, `no-such-store` or `other: <message>`). Each request is logged through
// `wasi:logging` (`trellis logs c-counter` shows the lines).
//
// Built by scripts/c-components.sh (`build_c_component examples/c-counter wit
// trellis:lattice/http-component OUT.wasm`), which generates `http_component.h` with wit-bindgen.
// It formats numbers itself rather than with snprintf, so no stdio (and no WASI preview 1 import)
// is linked in.

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "http_component.h"

typedef http_component_string_t string_t;

// A heap buffer that grows as text is appended; `data` is always NUL-terminated.
typedef struct {
    char *data;
    size_t len;
    size_t cap;
} text_t;

static void text_reserve(text_t *t, size_t extra) {
    if (t->len + extra + 1 <= t->cap) {
        return;
    }
    size_t cap = t->cap ? t->cap : 64;
    while (cap < t->len + extra + 1) {
        cap *= 2;
    }
    char *data = realloc(t->data, cap);
    if (!data) {
        abort();
    }
    t->data = data;
    t->cap = cap;
}

static void text_append(text_t *t, const char *bytes, size_t len) {
    text_reserve(t, len);
    memcpy(t->data + t->len, bytes, len);
    t->len += len;
    t->data[t->len] = '\0';
}

static void text_puts(text_t *t, const char *s) { text_append(t, s, strlen(s)); }

static void text_free(text_t *t) {
    free(t->data);
    t->data = NULL;
    t->len = t->cap = 0;
}

// Writes `n` in decimal to `out` (at least 21 bytes) and returns its length. (snprintf would pull
// wasi-libc's stdio, and with it preview 1 file imports, into the component.)
static size_t format_u64(uint64_t n, char *out) {
    char digits[20];
    size_t len = 0;
    do {
        digits[len++] = (char)('0' + n % 10);
        n /= 10;
    } while (n > 0);
    for (size_t i = 0; i < len; i++) {
        out[i] = digits[len - 1 - i];
    }
    out[len] = '\0';
    return len;
}

// A borrowed view of `len` bytes as a WIT string (no copy; the callee does not take ownership).
static string_t view(const char *bytes, size_t len) {
    string_t s = {(uint8_t *)bytes, len};
    return s;
}

// The counter's key for a request path: the path without its query and leading `/`, each
// character outside `A-Z a-z 0-9 _ -` replaced by one `_` (a multi-byte UTF-8 character counts as
// one character), or `count` for an empty path.
static void key_for(const uint8_t *path, size_t len, text_t *key) {
    const uint8_t *query = len > 0 ? memchr(path, '?', len) : NULL;
    if (query) {
        len = (size_t)(query - path);
    }
    if (len > 0 && path[0] == '/') {
        path++;
        len--;
    }
    if (len == 0) {
        text_puts(key, "count");
        return;
    }
    for (size_t i = 0; i < len; i++) {
        uint8_t c = path[i];
        bool plain = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                     c == '_' || c == '-';
        if (plain) {
            text_append(key, (const char *)&c, 1);
        } else if ((c & 0xC0) != 0x80) {
            // ASCII punctuation or the first byte of a UTF-8 sequence; continuation bytes add
            // nothing, so the whole character becomes one `_`.
            text_append(key, "_", 1);
        }
    }
}

// Appends the text of a key-value error and releases what the error owns.
static void describe(wasi_keyvalue_store_error_t *error, text_t *out) {
    switch (error->tag) {
    case WASI_KEYVALUE_STORE_ERROR_ACCESS_DENIED:
        text_puts(out, "access-denied");
        break;
    case WASI_KEYVALUE_STORE_ERROR_NO_SUCH_STORE:
        text_puts(out, "no-such-store");
        break;
    case WASI_KEYVALUE_STORE_ERROR_OTHER:
        text_puts(out, "other: ");
        text_append(out, (const char *)error->val.other.ptr, error->val.other.len);
        // wit-bindgen 0.63's wasi_keyvalue_store_error_free does not free this string.
        http_component_string_free(&error->val.other);
        break;
    default:
        text_puts(out, "unknown key-value error");
        break;
    }
}

// Increments `key` in the assigned bucket. On success stores the new value in `count`; on
// failure appends the error's text to `error` and returns false.
static bool count(const text_t *key, uint64_t *count, text_t *error) {
    string_t identifier = view("", 0);
    wasi_keyvalue_store_own_bucket_t bucket;
    wasi_keyvalue_store_error_t err;
    if (!wasi_keyvalue_store_open(&identifier, &bucket, &err)) {
        describe(&err, error);
        return false;
    }
    string_t name = view(key->data, key->len);
    bool ok = wasi_keyvalue_atomics_increment(wasi_keyvalue_store_borrow_bucket(bucket), &name, 1,
                                              count, &err);
    if (!ok) {
        describe(&err, error);
    }
    wasi_keyvalue_store_bucket_drop_own(bucket);
    return ok;
}

static void log_line(wasi_logging_logging_level_t level, const text_t *message) {
    string_t context = view("c-counter", strlen("c-counter"));
    string_t text = view(message->data, message->len);
    wasi_logging_logging_log(level, &context, &text);
}

static void append_header(wasi_http_types_own_fields_t headers, const char *name, const char *value) {
    wasi_http_types_field_name_t field = view(name, strlen(name));
    wasi_http_types_field_value_t bytes = {(uint8_t *)value, strlen(value)};
    wasi_http_types_header_error_t err;
    // Neither header is forbidden, so appending cannot fail.
    (void)wasi_http_types_method_fields_append(wasi_http_types_borrow_fields(headers), &field,
                                               &bytes, &err);
}

// Writes all of `body` (at most 4096 bytes per blocking write, as wasi:io allows).
static bool write_all(wasi_io_streams_own_output_stream_t stream, const char *body, size_t len) {
    wasi_io_streams_borrow_output_stream_t borrowed = wasi_io_streams_borrow_output_stream(stream);
    while (len > 0) {
        size_t chunk = len < 4096 ? len : 4096;
        http_component_list_u8_t bytes = {(uint8_t *)body, chunk};
        wasi_io_streams_stream_error_t err;
        if (!wasi_io_streams_method_output_stream_blocking_write_and_flush(borrowed, &bytes, &err)) {
            if (err.tag == WASI_IO_STREAMS_STREAM_ERROR_LAST_OPERATION_FAILED) {
                wasi_io_error_error_drop_own(err.val.last_operation_failed);
            }
            return false;
        }
        body += chunk;
        len -= chunk;
    }
    return true;
}

static void respond(wasi_http_types_own_response_outparam_t response_out, uint16_t status,
                    const text_t *body) {
    char length[24];
    format_u64(body->len, length);
    wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
    append_header(headers, "content-type", "text/plain");
    append_header(headers, "content-length", length);
    wasi_http_types_own_outgoing_response_t response =
        wasi_http_types_constructor_outgoing_response(headers);
    wasi_http_types_borrow_outgoing_response_t borrowed =
        wasi_http_types_borrow_outgoing_response(response);
    (void)wasi_http_types_method_outgoing_response_set_status_code(borrowed, status);
    wasi_http_types_own_outgoing_body_t outgoing;
    if (!wasi_http_types_method_outgoing_response_body(borrowed, &outgoing)) {
        wasi_http_types_outgoing_response_drop_own(response);
        wasi_http_types_response_outparam_drop_own(response_out);
        return;
    }
    wasi_http_types_result_own_outgoing_response_error_code_t result;
    result.is_err = false;
    result.val.ok = response;
    wasi_http_types_static_response_outparam_set(response_out, &result);

    wasi_io_streams_own_output_stream_t stream;
    if (!wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(outgoing),
                                                    &stream)) {
        wasi_http_types_outgoing_body_drop_own(outgoing);
        return;
    }
    bool written = write_all(stream, body->data, body->len);
    // The stream is a child of the body: it must be gone before the body is finished.
    wasi_io_streams_output_stream_drop_own(stream);
    if (!written) {
        wasi_http_types_outgoing_body_drop_own(outgoing);
        return;
    }
    wasi_http_types_error_code_t err;
    if (!wasi_http_types_static_outgoing_body_finish(outgoing, NULL, &err)) {
        wasi_http_types_error_code_free(&err);
    }
}

void exports_wasi_http_incoming_handler_handle(
    exports_wasi_http_incoming_handler_own_incoming_request_t request,
    exports_wasi_http_incoming_handler_own_response_outparam_t response_out) {
    string_t path;
    if (!wasi_http_types_method_incoming_request_path_with_query(
            wasi_http_types_borrow_incoming_request(request), &path)) {
        path.ptr = NULL;
        path.len = 0;
    }
    wasi_http_types_incoming_request_drop_own(request);

    text_t key = {0}, message = {0}, body = {0};
    key_for(path.ptr, path.len, &key);
    if (path.len > 0) {
        text_append(&message, (const char *)path.ptr, path.len);
    } else {
        text_puts(&message, "/");
    }
    http_component_string_free(&path);

    uint64_t n = 0;
    text_t error = {0};
    uint16_t status;
    char number[24];
    if (count(&key, &n, &error)) {
        format_u64(n, number);
        text_puts(&message, " \xe2\x86\x92 "); // " → "
        text_append(&message, key.data, key.len);
        text_puts(&message, " = ");
        text_puts(&message, number);
        log_line(WASI_LOGGING_LOGGING_LEVEL_INFO, &message);
        text_puts(&body, "c count: ");
        text_puts(&body, number);
        text_puts(&body, "\n");
        status = 200;
    } else {
        text_puts(&message, ": ");
        text_append(&message, error.data, error.len);
        log_line(WASI_LOGGING_LOGGING_LEVEL_ERROR, &message);
        text_append(&body, error.data, error.len);
        text_puts(&body, "\n");
        status = 500;
    }
    respond(response_out, status, &body);
    text_free(&key);
    text_free(&message);
    text_free(&body);
    text_free(&error);
}
