// A pipeline stage written in C (world trellis:test-c/stage in ../wit/stage.wit): serves
// `example:pipeline/transform`. Each call increments the key `c-calls` in the bucket opened with
// the empty identifier and appends `{name: "c", note: "<input reversed> #<count>"}` to the trail.
// A key-value error does not fail the call: the note becomes `kv: <error>` (`access-denied`,
// `no-such-store` or `other: <message>`). Input `trap` traps.
//
// Built by scripts/c-components.sh (`build_c_component tests/components/c/stage
// tests/components/c/wit trellis:test-c/stage OUT.wasm`), which generates `stage.h` with
// wit-bindgen.

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "stage.h"

typedef exports_example_pipeline_transform_stage_t stage_t;
typedef exports_example_pipeline_transform_list_stage_t stage_list_t;

// Takes ownership of `len` bytes in a fresh heap buffer as a WIT string.
static stage_string_t owned(const char *bytes, size_t len) {
    stage_string_t s;
    stage_string_dup_n(&s, bytes, len);
    return s;
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

// `input` reversed character by character: UTF-8 sequences keep their byte order, so the result
// is valid UTF-8 when the input is (and a WIT string always is).
static stage_string_t reversed(const stage_string_t *input) {
    char *out = malloc(input->len + 1);
    if (!out) {
        abort();
    }
    size_t end = input->len;
    size_t w = 0;
    while (end > 0) {
        size_t start = end - 1;
        while (start > 0 && (input->ptr[start] & 0xC0) == 0x80) {
            start--;
        }
        memcpy(out + w, input->ptr + start, end - start);
        w += end - start;
        end = start;
    }
    stage_string_t s = owned(out, w);
    free(out);
    return s;
}

// The note for a key-value error: `kv: <error>`. Releases what the error owns.
static stage_string_t kv_error_note(wasi_keyvalue_store_error_t *error) {
    const char *text;
    switch (error->tag) {
    case WASI_KEYVALUE_STORE_ERROR_ACCESS_DENIED:
        text = "kv: access-denied";
        break;
    case WASI_KEYVALUE_STORE_ERROR_NO_SUCH_STORE:
        text = "kv: no-such-store";
        break;
    case WASI_KEYVALUE_STORE_ERROR_OTHER: {
        const char *prefix = "kv: other: ";
        size_t prefix_len = strlen(prefix);
        size_t len = prefix_len + error->val.other.len;
        char *buf = malloc(len + 1);
        if (!buf) {
            abort();
        }
        memcpy(buf, prefix, prefix_len);
        memcpy(buf + prefix_len, error->val.other.ptr, error->val.other.len);
        stage_string_t note = owned(buf, len);
        free(buf);
        // wit-bindgen 0.63's wasi_keyvalue_store_error_free does not free this string.
        stage_string_free(&error->val.other);
        return note;
    }
    default:
        text = "kv: unknown error";
        break;
    }
    return owned(text, strlen(text));
}

// Increments `c-calls` and returns the stage's note.
static stage_string_t note_for(const stage_string_t *input) {
    stage_string_t identifier = {(uint8_t *)"", 0};
    wasi_keyvalue_store_own_bucket_t bucket;
    wasi_keyvalue_store_error_t error;
    if (!wasi_keyvalue_store_open(&identifier, &bucket, &error)) {
        return kv_error_note(&error);
    }
    stage_string_t key;
    stage_string_set(&key, "c-calls");
    uint64_t count = 0;
    bool ok = wasi_keyvalue_atomics_increment(wasi_keyvalue_store_borrow_bucket(bucket), &key, 1,
                                              &count, &error);
    wasi_keyvalue_store_bucket_drop_own(bucket);
    if (!ok) {
        return kv_error_note(&error);
    }

    stage_string_t rev = reversed(input);
    char suffix[32] = " #";
    size_t suffix_len = 2 + format_u64(count, suffix + 2);
    size_t len = rev.len + suffix_len;
    char *buf = malloc(len + 1);
    if (!buf) {
        abort();
    }
    if (rev.len > 0) {
        memcpy(buf, rev.ptr, rev.len);
    }
    memcpy(buf + rev.len, suffix, suffix_len);
    stage_string_t note = owned(buf, len);
    free(buf);
    stage_string_free(&rev);
    return note;
}

bool exports_example_pipeline_transform_run(stage_string_t *input, stage_list_t *trail,
                                            stage_list_t *ret, stage_string_t *err) {
    (void)err; // The call never fails.
    if (input->len == 4 && memcmp(input->ptr, "trap", 4) == 0) {
        __builtin_trap();
    }

    stage_t stage;
    stage.name = owned("c", 1);
    stage.note = note_for(input);
    stage_string_free(input);

    // The arguments belong to the callee, and the result is freed after the call returns, so the
    // trail's buffer is reused. An empty list has no allocation behind its pointer.
    stage_t *items;
    if (trail->len == 0) {
        items = malloc(sizeof(stage_t));
    } else {
        items = realloc(trail->ptr, (trail->len + 1) * sizeof(stage_t));
    }
    if (!items) {
        abort();
    }
    items[trail->len] = stage;
    ret->ptr = items;
    ret->len = trail->len + 1;
    return true;
}
