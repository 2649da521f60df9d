//! The HTTP twin of `hello`: a `wasi:http/proxy` component that answers
//! every request with `hello from bulkhead`. It exists to measure
//! `wasmtime serve` on the same machine as Bulkhead's own trivial job; the
//! Bulkhead sandbox does not run it (it exports no `wasi:cli/run`).

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

wasip2::http::proxy::export!(Hello);

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let response = OutgoingResponse::new(Fields::new());
        let Ok(body) = response.body() else {
            return;
        };
        ResponseOutparam::set(response_out, Ok(response));
        if let Ok(mut out) = body.write() {
            let _ = out.write_all(b"hello from bulkhead\n");
            let _ = out.flush();
        }
        let _ = OutgoingBody::finish(body, None);
    }
}
