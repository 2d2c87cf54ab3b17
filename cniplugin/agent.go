package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"strconv"
	"strings"
	"time"
)

// agentTimeout bounds the whole exchange with the agent; the agent answers within a smaller
// budget (503 at 4.5 s), so a slow ADD gets its "try again later" rather than a timeout.
const agentTimeout = 5 * time.Second

// maxAnswer is how much of the agent's answer body we read: it is a one-line message.
const maxAnswer = 4096

// addEvent is what ADD posts to the agent (`POST /cmdadd`): Istio's CNI event fields, and the
// pod UID when the runtime passes one.
type addEvent struct {
	Netns        string  `json:"Netns"`
	PodName      string  `json:"PodName"`
	PodNamespace string  `json:"PodNamespace"`
	IPs          []podIP `json:"IPs"`
	PodUID       string  `json:"PodUID,omitempty"`
}

type podIP struct {
	Address struct {
		IP string `json:"IP"`
	} `json:"Address"`
}

func newPodIPs(ips []string) []podIP {
	out := make([]podIP, len(ips))
	for i, ip := range ips {
		out[i].Address.IP = ip
	}
	return out
}

// unreachableError: no answer from the agent (no socket, refused, reset, timed out, or not HTTP).
type unreachableError struct{ err error }

func (e *unreachableError) Error() string { return e.err.Error() }

// postAddEvent posts the event; it returns nil when the agent answered 200, an *unreachableError
// when it did not answer, and a *pluginError carrying the agent's answer otherwise.
func postAddEvent(socketPath string, event *addEvent, timeout time.Duration) error {
	status, reason, text, err := post(socketPath, "/cmdadd", mustMarshal(event), timeout)
	if err != nil {
		return &unreachableError{err}
	}
	if status == 200 {
		return nil
	}
	code := codePlugin
	if status == 503 {
		code = codeTryAgainLater
	}
	if text == "" {
		text = reason
	}
	return &pluginError{
		code,
		"ztunnel-redirect agent refused pod: " + text,
		fmt.Sprintf("HTTP %d from %s", status, socketPath),
	}
}

// post sends one `POST <path>` of a JSON body over the Unix socket and reads the answer; timeout
// bounds the whole exchange, connecting included.
func post(socketPath, path, body string, timeout time.Duration) (status int, reason, text string, err error) {
	deadline := time.Now().Add(timeout)
	conn, err := net.DialTimeout("unix", socketPath, timeout)
	if err != nil {
		return 0, "", "", err
	}
	defer conn.Close()
	if err := conn.SetDeadline(deadline); err != nil {
		return 0, "", "", err
	}
	request := "POST " + path + " HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" +
		"Content-Length: " + strconv.Itoa(len(body)) + "\r\nConnection: close\r\n\r\n" + body
	if _, err := io.WriteString(conn, request); err != nil {
		return 0, "", "", err
	}
	return readResponse(bufio.NewReader(conn))
}

// readResponse reads an HTTP/1.x response: its status, reason and the start of its body (at most
// maxAnswer bytes, trimmed).
func readResponse(r *bufio.Reader) (status int, reason, text string, err error) {
	tp := textproto.NewReader(r)
	line, err := tp.ReadLine()
	if err != nil {
		return 0, "", "", err
	}
	proto, rest, _ := strings.Cut(line, " ")
	code, reason, _ := strings.Cut(rest, " ")
	status, convErr := strconv.Atoi(code)
	// Three digits, 100 to 999: "000", "-12" and "+99" pass Atoi and the length check alone.
	if !strings.HasPrefix(proto, "HTTP/1.") || convErr != nil || len(code) != 3 || status < 100 {
		return 0, "", "", fmt.Errorf("not an HTTP response: %q", truncate(line, 80))
	}
	header, err := tp.ReadMIMEHeader()
	if err != nil {
		return 0, "", "", err
	}
	var body io.Reader = r
	if strings.EqualFold(header.Get("Transfer-Encoding"), "chunked") {
		body = &chunkedReader{r: r}
	} else if length := header.Get("Content-Length"); length != "" {
		n, err := strconv.ParseInt(length, 10, 64)
		if err != nil || n < 0 {
			return 0, "", "", fmt.Errorf("bad Content-Length %q", truncate(length, 20))
		}
		if n > maxAnswer {
			n = maxAnswer
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(r, data); err != nil {
			return 0, "", "", err
		}
		return status, reason, answerText(data), nil
	}
	// Without a length the body ends with the connection (we asked for `Connection: close`).
	data, err := io.ReadAll(io.LimitReader(body, maxAnswer))
	if err != nil {
		return 0, "", "", err
	}
	return status, reason, answerText(data), nil
}

func answerText(data []byte) string {
	return strings.TrimSpace(strings.ToValidUTF8(string(data), "\uFFFD"))
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// chunkedReader decodes a chunked body (RFC 9112 §7.1); trailers are not read.
type chunkedReader struct {
	r    *bufio.Reader
	left int64 // bytes left in the current chunk
	done bool
}

func (c *chunkedReader) Read(p []byte) (int, error) {
	if c.done {
		return 0, io.EOF
	}
	if c.left == 0 {
		line, err := c.r.ReadString('\n')
		if err != nil {
			return 0, err
		}
		size, _, _ := strings.Cut(strings.TrimSpace(line), ";")
		n, err := strconv.ParseInt(size, 16, 64)
		if err != nil || n < 0 {
			return 0, errors.New("bad chunk size")
		}
		if n == 0 {
			c.done = true
			return 0, io.EOF
		}
		c.left = n
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= int64(n)
	if c.left == 0 && err == nil {
		_, err = c.r.Discard(2) // the CRLF after the chunk
	}
	return n, err
}
