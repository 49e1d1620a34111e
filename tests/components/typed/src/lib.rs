//! Typed exports for the JSON conversion tests, and an empty one for the call-overhead benchmark.
wit_bindgen::generate!({ world: "typed", path: "../wit" });

use exports::trellis::test::shapes::{self, Color, Perms, Point, Shape};

struct Typed;

impl Guest for Typed {
    fn add(a: i32, b: i32) -> i32 {
        a.wrapping_add(b)
    }

    fn noop() {}

    fn echo(input: String) -> String {
        input
    }
}

impl shapes::Guest for Typed {
    fn scale(points: Vec<Point>, factor: i32) -> Vec<Point> {
        points
            .into_iter()
            .map(|p| Point {
                x: p.x.wrapping_mul(factor),
                y: p.y.wrapping_mul(factor),
                label: p.label,
            })
            .collect()
    }

    fn describe(c: Color, p: Perms, s: Shape) -> String {
        let shape = match s {
            Shape::Circle(r) => format!("circle r={r}"),
            Shape::Rect((w, h)) => format!("rect {w}x{h}"),
            Shape::Empty => "empty".to_string(),
        };
        let mut perms = Vec::new();
        if p.contains(Perms::READ) {
            perms.push("read");
        }
        if p.contains(Perms::WRITE) {
            perms.push("write");
        }
        if p.contains(Perms::EXEC) {
            perms.push("exec");
        }
        format!("{c:?} [{}] {shape}", perms.join(","))
    }

    fn check(n: u8, c: char) -> Result<u64, String> {
        if n == 0 {
            Err(format!("n must not be zero (c = {c})"))
        } else {
            Ok(u64::from(n) * u64::from(u32::from(c)))
        }
    }

    fn swap(pair: (bool, i64)) -> (i64, bool) {
        (pair.1, pair.0)
    }

    fn invert(p: Perms, c: Color) -> (Perms, Color) {
        let next = match c {
            Color::Red => Color::Green,
            Color::Green => Color::Blue,
            Color::Blue => Color::Red,
        };
        (Perms::all() - p, next)
    }
}

export!(Typed);
