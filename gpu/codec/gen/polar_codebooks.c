/* polar_codebooks: generator of PolarQuant's analytic angle codebooks (quantizers.md
 * `polarquant` step 4; quantizers-reference.md §2.3 table). Not part of the library: the
 * constants it prints are committed in gpu/codec/codec_polarquant.h; rerun it to check them.
 *
 * Build and run by hand (no CMake target, on purpose):
 *   cc -std=c11 -O2 -Wall -Wextra -ffp-contract=off -o /tmp/polar_codebooks \
 *       gpu/codec/gen/polar_codebooks.c -lm
 *   /tmp/polar_codebooks          # C tables for gpu/codec/codec_polarquant.h
 *   /tmp/polar_codebooks --table  # the §2.3 table (levels 2..7 at 2 bits, 2..4 at 3 bits)
 *
 * Method. After a Haar (or randomized Hadamard) rotation, the level-l angle of the
 * recursive polar transform has density f_l(psi) ∝ sin^(2^(l-1)-1)(2 psi) on [0, pi/2]
 * (level l >= 2; level 1 is uniform on [0, 2 pi), its 16 centroids are (k + 1/2) pi/8 and
 * need no computation). Lloyd-Max for 2^b cells: boundaries = midpoints of adjacent
 * centroids, centroids = conditional means of the cells. The density is sampled on a
 * midpoint grid of N = 2e6 points (>= 1e5 as the spec asks); prefix sums of w, w psi and
 * w psi^2 make each Lloyd iteration O(2^b); a boundary falling inside a grid cell takes
 * that cell's mass pro rata, so the cell means are continuous in the boundaries and the
 * iteration converges to a fixed point (stopped at max |change| < 1e-15 rad).
 * Everything in double; the header stores floats (centroids, their cos and sin, the
 * decision boundaries and their cos and sin, all rounded once from double).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NGRID 2000000
#define KMAX 8

static const double PI = 3.14159265358979323846;

typedef struct grid {
    double h;
    double *w, *W, *M1, *M2; /* weights; prefix sums of w, w psi, w psi^2 (length N+1) */
} grid;

static void grid_init(grid *g, int m)
{
    g->h = (PI / 2) / NGRID;
    g->w = malloc(NGRID * sizeof(double));
    g->W = malloc((NGRID + 1) * sizeof(double));
    g->M1 = malloc((NGRID + 1) * sizeof(double));
    g->M2 = malloc((NGRID + 1) * sizeof(double));
    if (!g->w || !g->W || !g->M1 || !g->M2) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    g->W[0] = g->M1[0] = g->M2[0] = 0;
    for (int i = 0; i < NGRID; i++) {
        double psi = (i + 0.5) * g->h;
        double w = pow(sin(2 * psi), m);
        g->w[i] = w;
        g->W[i + 1] = g->W[i] + w;
        g->M1[i + 1] = g->M1[i] + w * psi;
        g->M2[i + 1] = g->M2[i] + w * psi * psi;
    }
}

static void grid_free(grid *g)
{
    free(g->w);
    free(g->W);
    free(g->M1);
    free(g->M2);
}

/* Cumulative (mass, first moment, second moment) of the grid below x, a cell cut
 * pro rata (the cell's points all sit at its midpoint). */
static void cum(const grid *g, double x, double *m0, double *m1, double *m2)
{
    double u = x / g->h;
    if (u <= 0) {
        *m0 = *m1 = *m2 = 0;
        return;
    }
    if (u >= NGRID) {
        *m0 = g->W[NGRID];
        *m1 = g->M1[NGRID];
        *m2 = g->M2[NGRID];
        return;
    }
    int j = (int)u;
    double f = u - j, psi = (j + 0.5) * g->h, w = g->w[j] * f;
    *m0 = g->W[j] + w;
    *m1 = g->M1[j] + w * psi;
    *m2 = g->M2[j] + w * psi * psi;
}

/* Lloyd-Max with k cells on density sin^m(2 psi); returns the normalized MSE. */
static double lloyd(int m, int k, double *c, double *b)
{
    grid g;
    grid_init(&g, m);
    for (int i = 0; i < k; i++)
        c[i] = (i + 0.5) * (PI / 2) / k;
    for (int it = 0; it < 1000000; it++) {
        for (int i = 0; i + 1 < k; i++)
            b[i] = 0.5 * (c[i] + c[i + 1]);
        double delta = 0;
        for (int i = 0; i < k; i++) {
            double lo = i ? b[i - 1] : 0, hi = i + 1 < k ? b[i] : PI / 2;
            double a0, a1, a2, z0, z1, z2;
            cum(&g, lo, &a0, &a1, &a2);
            cum(&g, hi, &z0, &z1, &z2);
            double nc = (z1 - a1) / (z0 - a0);
            delta = fmax(delta, fabs(nc - c[i]));
            c[i] = nc;
        }
        if (delta < 1e-15)
            break;
    }
    for (int i = 0; i + 1 < k; i++)
        b[i] = 0.5 * (c[i] + c[i + 1]);
    /* MSE = sum over cells of E[(psi - c)^2] = M2 - 2 c M1 + c^2 M0, normalized */
    double mse = 0;
    for (int i = 0; i < k; i++) {
        double lo = i ? b[i - 1] : 0, hi = i + 1 < k ? b[i] : PI / 2;
        double a0, a1, a2, z0, z1, z2;
        cum(&g, lo, &a0, &a1, &a2);
        cum(&g, hi, &z0, &z1, &z2);
        mse += (z2 - a2) - 2 * c[i] * (z1 - a1) + c[i] * c[i] * (z0 - a0);
    }
    mse /= g.W[NGRID];
    grid_free(&g);
    return mse;
}

static void print_row(const char *name, const double *v, int n)
{
    printf("    /* %-8s */ {", name);
    for (int i = 0; i < n; i++)
        printf("%s%.9gf",
               i == 0  ? ""
               : i % 4 ? ", "
                       : ",\n                   ",
               (double)(float)v[i]);
    printf("},\n");
}

static void print_table(void)
{
    printf("| level | bits | centroids | boundaries | angle MSE |\n");
    for (int bits = 2; bits <= 3; bits++)
        for (int l = 2; l <= (bits == 2 ? 7 : 4); l++) {
            double c[KMAX], b[KMAX];
            int k = 1 << bits;
            double mse = lloyd((1 << (l - 1)) - 1, k, c, b);
            printf("| %d | %d |", l, bits);
            for (int i = 0; i < k; i++)
                printf(" %.6f", c[i]);
            printf(" |");
            for (int i = 0; i + 1 < k; i++)
                printf(" %.6f", b[i]);
            printf(" | %.3e |\n", mse);
        }
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--table") == 0) {
        print_table();
        return 0;
    }
    double c[3][4], b[3][3], mse[3];
    for (int l = 2; l <= 4; l++)
        mse[l - 2] = lloyd((1 << (l - 1)) - 1, 4, c[l - 2], b[l - 2]);

    printf("/* clang-format off */\n");
    printf(
        "/* Generated by gpu/codec/gen/polar_codebooks.c (Lloyd-Max, double, %d-point grid). */\n",
        NGRID);
    printf("/* Angle MSE (rad^2): level 1 %.4e, level 2 %.4e,\n"
           " * level 3 %.4e, level 4 %.4e */\n",
           (PI / 8) * (PI / 8) / 12, mse[0], mse[1], mse[2]);

    double v[16];
    printf("/* level 1: centroid k = (k + 1/2) pi/8; cos, sin */\n");
    printf("KVS_PQ_TABLE float kvs_pq_l1_cs[2][16] = {\n");
    for (int i = 0; i < 16; i++)
        v[i] = cos((i + 0.5) * PI / 8);
    print_row("cos", v, 16);
    for (int i = 0; i < 16; i++)
        v[i] = sin((i + 0.5) * PI / 8);
    print_row("sin", v, 16);
    printf("};\n");
    printf("/* level 1, within a quadrant: boundaries pi/8, pi/4, 3pi/8; cos, sin */\n");
    printf("KVS_PQ_TABLE float kvs_pq_l1_bcs[2][3] = {\n");
    for (int i = 0; i < 3; i++)
        v[i] = cos((i + 1) * PI / 8);
    print_row("cos", v, 3);
    for (int i = 0; i < 3; i++)
        v[i] = sin((i + 1) * PI / 8);
    print_row("sin", v, 3);
    printf("};\n");

    const char *what[6] = {"centroid", "cos", "sin", "bound", "bcos", "bsin"};
    printf("/* levels 2..4 (index level - 2): centroids and their cos, sin */\n");
    printf("KVS_PQ_TABLE float kvs_pq_cb[3][3][4] = {\n");
    for (int l = 0; l < 3; l++) {
        printf("  { /* level %d */\n", l + 2);
        for (int f = 0; f < 3; f++) {
            for (int i = 0; i < 4; i++)
                v[i] = f == 0 ? c[l][i] : f == 1 ? cos(c[l][i]) : sin(c[l][i]);
            print_row(what[f], v, 4);
        }
        printf("  },\n");
    }
    printf("};\n");
    printf("/* levels 2..4: decision boundaries and their cos, sin */\n");
    printf("KVS_PQ_TABLE float kvs_pq_bd[3][3][3] = {\n");
    for (int l = 0; l < 3; l++) {
        printf("  { /* level %d */\n", l + 2);
        for (int f = 0; f < 3; f++) {
            for (int i = 0; i < 3; i++)
                v[i] = f == 0 ? b[l][i] : f == 1 ? cos(b[l][i]) : sin(b[l][i]);
            print_row(what[3 + f], v, 3);
        }
        printf("  },\n");
    }
    printf("};\n");
    printf("/* clang-format on */\n");
    return 0;
}
